"""When a plain tunnel whose dst ended sends its close frame.

Two waits, both bounded (docs/protocol.md §7). First the client must have
received every byte before the close (v2ray-plugin drops what it has not yet
delivered when it reads a close frame): the caller says whether it has; until
it has, it is asked again at doubling intervals, from `flush_poll` up to
`quiet`, for at most `flush_max`. Then the client must have been quiet for
`quiet` (the Go client panics on a close that races its own write), but the
close goes at most `drain_max` after the flush ended.

Sans-I/O: the caller owns the timers and the clock, and passes `now` in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Close:
    """Send the close frame now."""

    flush_timed_out: bool = False  # this poll gave up waiting for the client to receive


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Ask again at `at` (loop time)."""

    at: float
    flush_timed_out: bool = False  # this poll gave up waiting for the client to receive


class CloseSchedule:
    """The close-frame decision of one draining tunnel."""

    __slots__ = (
        "_drain_max",
        "_flush_deadline",
        "_flush_poll",
        "_flushed_at",
        "_last_client_data",
        "_quiet",
    )

    def __init__(
        self, now: float, *, flush_max: float, flush_poll: float, quiet: float, drain_max: float
    ) -> None:
        self._flush_deadline = now + flush_max
        self._flush_poll = flush_poll
        self._quiet = quiet
        self._drain_max = drain_max
        self._last_client_data = now
        self._flushed_at: float | None = None

    @property
    def flushing(self) -> bool:
        """Whether the next poll still needs to know if the client has it all."""
        return self._flushed_at is None

    def client_data(self, now: float) -> None:
        """The client sent data (discarded): the quiet period starts again."""
        self._last_client_data = now

    def poll(self, now: float, client_has_all: bool) -> Close | WaitUntil:
        """What to do now; client_has_all matters only while `flushing`."""
        timed_out = False
        if self._flushed_at is None:
            if not client_has_all and now < self._flush_deadline:
                at = now + self._flush_poll
                self._flush_poll = min(self._flush_poll * 2, self._quiet)
                return WaitUntil(at)
            timed_out = not client_has_all
            self._flushed_at = now
        quiet_until = max(self._last_client_data, self._flushed_at) + self._quiet
        give_up_at = self._flushed_at + self._drain_max
        if now >= quiet_until or now >= give_up_at:
            return Close(timed_out)
        return WaitUntil(min(quiet_until, give_up_at), timed_out)
