"""The decisions about open tunnels (mtt.core.enforcement), with the time passed in."""

from __future__ import annotations

from mtt.core.enforcement import budget, cut_message, cut_reason, expiry_delay, quota_left
from mtt.core.users import NO_LIMITS, UserLimits

NOW = 1_800_000_000.0


def test_no_limits_never_cut() -> None:
    assert cut_reason(NO_LIMITS, NOW, 10**15) is None
    assert quota_left(NO_LIMITS, 10**15) is None
    assert expiry_delay(NO_LIMITS, NOW, 2.0) is None


def test_expire_cuts_from_that_second_on() -> None:
    limits = UserLimits(expire=int(NOW) + 2)
    assert cut_reason(limits, NOW + 1.999, 0) is None
    assert cut_reason(limits, NOW + 2, 0) == "expired"
    assert cut_reason(limits, NOW + 3600, 0) == "expired"


def test_quota_cuts_once_used_up_exactly() -> None:
    limits = UserLimits(quota=1000)
    assert cut_reason(limits, NOW, 999) is None
    assert cut_reason(limits, NOW, 1000) == "quota"
    assert cut_reason(limits, NOW, 5000) == "quota"
    assert quota_left(limits, 0) == 1000
    assert quota_left(limits, 999) == 1
    assert quota_left(limits, 1000) == 0
    assert quota_left(limits, 5000) == 0  # never negative


def test_expiry_names_its_reason_before_the_quota() -> None:
    limits = UserLimits(quota=10, expire=int(NOW))
    assert cut_reason(limits, NOW, 50) == "expired"


def test_expiry_delay_within_the_horizon_only() -> None:
    limits = UserLimits(expire=int(NOW) + 2)
    assert expiry_delay(limits, NOW, 2.0) == 2.0
    assert expiry_delay(limits, NOW + 0.5, 2.0) == 1.5
    assert expiry_delay(limits, NOW - 1, 2.0) is None  # 3 s away: a later check arms it
    assert expiry_delay(limits, NOW + 10, 2.0) == 0.0  # passed: at once


def test_a_budget_is_the_quota_left_less_what_is_not_reported_yet() -> None:
    assert budget(1000, 0) == 1000
    assert budget(1000, 400) == 600
    assert budget(1000, 1500) == -500  # already over: the caller cuts at once


def test_the_cut_line_names_user_reason_and_count() -> None:
    quota = UserLimits(quota=1048576)
    line = cut_message("/p", "quota", quota, quota_used=1050000, tunnels=3, now=NOW)
    assert line == "user /p: quota used up (1050000 of 1048576 bytes); closing 3 tunnels"
    expire = UserLimits(expire=int(NOW) - 1)
    line = cut_message("/e", "expired", expire, quota_used=0, tunnels=1, now=NOW + 0.25)
    assert line == f"user /e: expired at {int(NOW) - 1} (1.2 s ago); closing 1 tunnel"
