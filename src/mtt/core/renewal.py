"""When a certificate is renewed and how failed orders are retried (pure: times
are POSIX seconds passed in, the caller owns the clock and the sleeping).

A certificate is renewed once less than a third of its lifetime is left, or
less than `ahead_max` (30 days by default, as certbot), whichever comes
first: Let's Encrypt's 90-day certificates at 60 days, a 6-day one at 4 days,
a test CA's 30-second one after 20 s. A failed order is retried after
`first`, doubling each time up to `cap`, so a broken setup costs the CA a
handful of orders an hour (Let's Encrypt allows 5 failed validations per
name and hour).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delays after failed orders: first, 2 x first, ... up to cap."""

    first: float
    cap: float

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1 for the first)."""
        if failures <= 0:
            return 0.0
        # 2 ** 62 overflows nothing: the min() cuts it down first
        return float(min(self.first * 2 ** min(failures - 1, 62), self.cap))


def renewal_time(not_before: float, not_after: float, ahead_max: float, fraction: int) -> float:
    """When a certificate valid from not_before to not_after should be renewed:
    when 1/fraction of its lifetime is left, or ahead_max before its end if sooner."""
    lifetime = max(not_after - not_before, 0.0)
    ahead = min(lifetime / fraction, ahead_max)
    return not_after - ahead


def due(now: float, not_before: float, not_after: float, ahead_max: float, fraction: int) -> bool:
    """Whether a certificate needs renewing at `now`."""
    return now >= renewal_time(not_before, not_after, ahead_max, fraction)


def next_attempt(now: float, failures: int, backoff: Backoff) -> float:
    """When to order again after `failures` consecutive failed orders."""
    return now + backoff.delay(failures)
