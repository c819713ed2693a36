"""One event-loop timer per smux session, serving two clocks: the session's
own deadline (keepalive NOPs and timeout, from SmuxSession.get_timer()) and a
periodic sweep for streams idle past the tunnel idle timeout.

Server and client drive their sessions the same way; only what they do when
it fires differs, so that is the callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mtt.smux import SmuxConfig


class SessionTimer:
    """Call `fire(now, sweep)` at the earlier of the smux deadline and the next sweep."""

    __slots__ = ("_at", "_fire", "_handle", "_loop", "_next_sweep", "_sweep_every")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        idle_timeout: float,
        config: SmuxConfig,
        fire: Callable[[float, bool], None],
    ) -> None:
        self._loop = loop
        self._fire = fire
        # A fraction of the idle timeout: an idle stream closes soon after it (SmuxConfig).
        every = idle_timeout / config.idle_sweeps
        self._sweep_every = max(config.idle_sweep_min, min(every, config.idle_sweep_max))
        self._next_sweep = loop.time() + self._sweep_every
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def rearm(self, smux_deadline: float | None) -> None:
        """Schedule the next call; cheap when the deadline did not move."""
        deadline = self._next_sweep
        if smux_deadline is not None:
            deadline = min(deadline, smux_deadline)
        if self._handle is not None:
            if deadline == self._at:
                return
            self._handle.cancel()
        self._at = deadline
        self._handle = self._loop.call_at(deadline, self._on_timer)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _on_timer(self) -> None:
        self._handle = None
        now = self._loop.time()
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + self._sweep_every
        self._fire(now, sweep)
