"""Per-user rate limits shared by every tunnel of the user, in every worker.

The budget lives in one place (the user service, TokenSchedule); each process
spends from a local allowance (Throttle) and asks for more when it runs out,
so a user's tunnels spread over several workers still share one rate. Both
halves are free of I/O: the caller moves the requests and owns the clock.

Bytes are charged after they are read, so a process may overdraw by one read
per tunnel; the schedule charges the overdraft to the next grant, which keeps
the long-run rate exact. How much a grant adds and how much a quiet user may
spend at once are the caller's GrantRules (from the server's Limits).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Direction(enum.IntEnum):
    """Which way bytes go: a tunnel's two throttles, a schedule's key, the RPC's "dir"."""

    UP = 0  # client to dst
    DOWN = 1  # dst to client


@dataclass(frozen=True, slots=True)
class GrantRules:
    """How a schedule hands out its rate."""

    burst: float  # seconds of rate a quiet user may spend at once
    grants_per_second: int  # a grant adds at least 1/this of a second of the rate ...
    min_grant: int  # ... and at least this many bytes, beyond what was asked


class TokenSchedule:
    """The service's budget for one user and direction, as a virtual clock:
    every grant of n bytes occupies n / rate seconds of it."""

    __slots__ = ("next_free", "rate", "rules")

    def __init__(self, rate: int, rules: GrantRules) -> None:
        self.rate = rate
        self.rules = rules
        self.next_free = 0.0

    def reserve(self, want: int, now: float) -> tuple[int, float]:
        """(bytes granted, seconds to wait before handing them out)."""
        rate, rules = self.rate, self.rules
        grant = max(want, 0) + max(rate // rules.grants_per_second, rules.min_grant)
        start = max(self.next_free, now - rules.burst)
        self.next_free = start + grant / rate
        return grant, max(0.0, start - now)


class Pausable(Protocol):
    """A tunnel, as its throttle sees it."""

    def throttle_pause(self, direction: Direction) -> None: ...
    def throttle_resume(self, direction: Direction) -> None: ...


class Throttle:
    """One user's one direction in one process."""

    __slots__ = ("_ask", "_asking", "_paused", "allowance", "direction")

    def __init__(self, direction: Direction, ask: Callable[[int], None]) -> None:
        self.direction = direction
        self.allowance = 0
        self._ask = ask  # request n more bytes; the answer comes to granted()
        self._asking = False
        self._paused: set[Pausable] = set()

    def charge(self, size: int, tunnel: Pausable) -> None:
        """size bytes were just read for tunnel; pause it if that overdrew."""
        self.allowance -= size
        if self.allowance >= 0:
            return
        if tunnel not in self._paused:
            self._paused.add(tunnel)
            tunnel.throttle_pause(self.direction)
        if not self._asking:
            self._asking = True
            self._ask(-self.allowance)

    def granted(self, size: int) -> None:
        self._asking = False
        self.allowance += size
        if self.allowance >= 0:
            self.release_all()
        elif self._paused:
            self._asking = True
            self._ask(-self.allowance)

    def forget(self, tunnel: Pausable) -> None:
        """The tunnel closed."""
        self._paused.discard(tunnel)

    def release_all(self) -> None:
        """Resume every paused tunnel (the limit was met, lifted or changed)."""
        paused, self._paused = self._paused, set()
        for tunnel in paused:
            tunnel.throttle_resume(self.direction)
