"""Limits on live tunnels: when a user's open tunnels must close because its
`expire` has passed or its quota is used up, and how much a process may still
relay for it before that happens.

Admission (mtt.core.admission) refuses new tunnels; this module decides about
the ones already open. Pure: the caller passes the time, the quota used (from
the store) and the bytes it counted since; the service and its agents only
schedule and carry out what is decided here.

Quota over several processes (docs/controller.md, "Limits on open tunnels"):
after every counter collection the service hands each process the quota still
left; a process closes the user's tunnels as soon as what it counted since
reaches that, without waiting for the others. Each process may therefore
spend the whole remainder before the next collection shows the sum, so N
processes overshoot by at most (N - 1) times the remainder of the last
collection, and never by more than the traffic of one collection interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mtt.core.admission import expired, over_quota
from mtt.core.users import UserLimits

Cut = Literal["expired", "quota"]


@dataclass(frozen=True, slots=True)
class Blocked:
    """A user whose open tunnels the server closed, why and when (unix time)."""

    reason: Cut
    at: float


def cut_reason(limits: UserLimits, now: float, quota_used: int) -> Cut | None:
    """Why the user's open tunnels must close now, or None if they may stay."""
    if expired(limits, now):
        return "expired"
    if over_quota(limits, quota_used):
        return "quota"
    return None


def quota_left(limits: UserLimits, quota_used: int) -> int | None:
    """Bytes the user may still move, or None without a quota."""
    if not limits.quota:
        return None
    return max(0, limits.quota - quota_used)


def expiry_delay(limits: UserLimits, now: float, horizon: float) -> float | None:
    """Seconds from now until `expire`, when it falls within horizon (0 once
    passed); None without an expire or when it is further away (a later check
    schedules it)."""
    if not limits.expire:
        return None
    delay = limits.expire - now
    if delay > horizon:
        return None
    return max(0.0, delay)


def budget(left: int, unreported: int) -> int:
    """What a process may still count for a user: the quota left as the service
    last knew it, less what the process counted that the service has not seen."""
    return left - unreported


def cut_message(
    path: str, reason: Cut, limits: UserLimits, *, quota_used: int, tunnels: int, now: float
) -> str:
    """The one log line of a cut: who, why, and how many tunnels it closes."""
    if reason == "expired":
        late = now - limits.expire
        why = f"expired at {limits.expire} ({late:.1f} s ago)"
    else:
        why = f"quota used up ({quota_used} of {limits.quota} bytes)"
    return f"user {path}: {why}; closing {tunnels} tunnel{'s' if tunnels != 1 else ''}"
