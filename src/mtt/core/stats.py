"""Process-wide event counts for metrics: cheap integer bumps where things
happen, taken as deltas by the user service's collection (every second and
on each scrape), so a restarted worker never makes a counter go backwards.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

# Seconds from accept to the upgrade handed over (TLS included): loopback is
# ~1 ms, a far client on a slow link a few hundred.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Stats:
    __slots__ = ("dial_failures", "handshake_failures", "latency", "latency_sum", "opened")

    def __init__(self) -> None:
        self._zero()

    def _zero(self) -> None:
        self.opened: Counter[str] = (
            Counter()
        )  # tunnels by mode, streams (smux, Mux.Cool) as "stream"
        self.handshake_failures: Counter[str] = Counter()
        self.dial_failures: Counter[str] = Counter()
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # the last is +Inf
        self.latency_sum = 0.0

    def handshake_failed(self, reason: str) -> None:
        self.handshake_failures[reason] += 1

    def dial_failed(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):
            reason = "timeout"
        elif isinstance(exc, ConnectionRefusedError):
            reason = "refused"
        else:
            reason = "other"
        self.dial_failures[reason] += 1

    def handshake_done(self, seconds: float) -> None:
        self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def take(self) -> dict[str, Any]:
        """Everything counted since the last take, as JSON."""
        out = {
            "opened": dict(self.opened),
            "handshake_failures": dict(self.handshake_failures),
            "dial_failures": dict(self.dial_failures),
            "latency": self.latency,
            "latency_sum": self.latency_sum,
        }
        self._zero()
        return out


STATS = Stats()


class StatsTotals(Stats):
    """The sum over every process since the server started (the user service's)."""

    __slots__ = ("bytes_down", "bytes_up")

    def __init__(self) -> None:
        super().__init__()
        self.bytes_up = 0
        self.bytes_down = 0

    def add(self, delta: dict[str, Any]) -> None:
        self.opened.update(delta["opened"])
        self.handshake_failures.update(delta["handshake_failures"])
        self.dial_failures.update(delta["dial_failures"])
        for i, n in enumerate(delta["latency"]):
            self.latency[i] += n
        self.latency_sum += delta["latency_sum"]
