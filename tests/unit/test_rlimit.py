"""Raising the soft RLIMIT_NOFILE to the hard one at start, as Go programs do."""

from __future__ import annotations

import resource

from mtt.config import Limits
from mtt.workers.rlimit import describe, raise_nofile

UNLIMITED_CAP = Limits().nofile_unlimited_cap


class FakeLimits:
    def __init__(self, soft: int, hard: int, fail: Exception | None = None) -> None:
        self.limits = (soft, hard)
        self.fail = fail
        self.calls: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def set(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls.append(limits)
        if self.fail is not None:
            raise self.fail
        self.limits = limits


def test_soft_is_raised_to_hard() -> None:
    fake = FakeLimits(1024, 20_000)
    assert raise_nofile(UNLIMITED_CAP, fake.get, fake.set) == (1024, 20_000, None)
    assert fake.calls == [(20_000, 20_000)]
    assert describe(1024, 20_000, None) == (
        "open files limit raised from 1024 to 20000 (the hard limit)"
    )


def test_nothing_to_do_when_soft_is_hard() -> None:
    fake = FakeLimits(20_000, 20_000)
    assert raise_nofile(UNLIMITED_CAP, fake.get, fake.set) == (20_000, 20_000, None)
    assert fake.calls == []
    assert describe(20_000, 20_000, None) == "open files limit 20000"


def test_unlimited_hard_limit_is_capped() -> None:
    """An "unlimited" hard limit (macOS) cannot be the soft one: Linux's ceiling instead."""
    fake = FakeLimits(256, resource.RLIM_INFINITY)
    assert raise_nofile(UNLIMITED_CAP, fake.get, fake.set) == (256, UNLIMITED_CAP, None)
    assert fake.calls == [(UNLIMITED_CAP, resource.RLIM_INFINITY)]
    assert raise_nofile(5000, FakeLimits(256, resource.RLIM_INFINITY).get, fake.set)[1] == 5000


def test_huge_hard_limit_is_taken_as_is() -> None:
    fake = FakeLimits(1024, 1 << 20)
    assert raise_nofile(UNLIMITED_CAP, fake.get, fake.set) == (1024, 1 << 20, None)


def test_a_refused_raise_keeps_the_limit_and_says_why() -> None:
    fake = FakeLimits(1024, 4096, ValueError("not allowed to raise maximum limit"))
    before, now, error = raise_nofile(UNLIMITED_CAP, fake.get, fake.set)
    assert (before, now, error) == (1024, 1024, "not allowed to raise maximum limit")
    assert describe(before, now, error) == (
        "open files limit stays 1024: cannot raise it to the hard limit "
        "(not allowed to raise maximum limit)"
    )


def test_this_process() -> None:
    """Against the real limits: afterwards soft == hard (or the reason it is not)."""
    before, now, error = raise_nofile(UNLIMITED_CAP)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == now
    assert error is not None or hard in (soft, resource.RLIM_INFINITY)
    assert now >= before
