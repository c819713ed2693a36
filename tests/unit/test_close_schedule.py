"""The plain tunnel's close-frame schedule, with the clock passed in."""

from __future__ import annotations

import pytest

from mtt.config import Limits
from mtt.wire.close_schedule import Close, CloseSchedule, WaitUntil

LIMITS = Limits()
FLUSH_MAX = LIMITS.close_flush_max
POLL = LIMITS.close_flush_poll
QUIET = LIMITS.drain_quiet
DRAIN_MAX = LIMITS.drain_max
T0 = 1000.0


def schedule(now: float = T0) -> CloseSchedule:
    return CloseSchedule(
        now, flush_max=FLUSH_MAX, flush_poll=POLL, quiet=QUIET, drain_max=DRAIN_MAX
    )


def test_the_default_limits_are_what_these_tests_assume() -> None:
    assert POLL < QUIET < DRAIN_MAX < FLUSH_MAX


def test_a_client_that_has_everything_gets_the_close_after_the_quiet_period() -> None:
    s = schedule()
    assert s.poll(T0, client_has_all=True) == WaitUntil(T0 + QUIET)
    assert not s.flushing
    assert s.poll(T0 + QUIET / 2, client_has_all=True) == WaitUntil(T0 + QUIET)
    assert s.poll(T0 + QUIET, client_has_all=True) == Close()


def test_while_the_client_is_receiving_the_polls_double_up_to_the_quiet_period() -> None:
    s = schedule()
    now = T0
    intervals = []
    for _ in range(8):
        decision = s.poll(now, client_has_all=False)
        assert isinstance(decision, WaitUntil)
        assert not decision.flush_timed_out
        intervals.append(decision.at - now)
        now = decision.at
    assert intervals == pytest.approx([min(POLL * 2**i, QUIET) for i in range(8)])
    assert intervals[-1] == pytest.approx(QUIET)  # the doubling reached the cap
    assert s.flushing


def test_the_quiet_period_counts_from_the_flush_not_from_the_drain_start() -> None:
    s = schedule()
    assert isinstance(s.poll(T0, client_has_all=False), WaitUntil)
    flushed = T0 + 2.0
    assert s.poll(flushed, client_has_all=True) == WaitUntil(flushed + QUIET)
    assert s.poll(flushed + QUIET - 1e-6, client_has_all=True) == WaitUntil(flushed + QUIET)
    assert s.poll(flushed + QUIET, client_has_all=True) == Close()


def test_client_data_keeps_the_close_waiting_until_it_has_been_quiet() -> None:
    s = schedule()
    assert s.poll(T0, client_has_all=True) == WaitUntil(T0 + QUIET)
    s.client_data(T0 + 0.08)
    # the timer armed for T0 + QUIET fires, finds fresh data, waits again
    assert s.poll(T0 + QUIET, client_has_all=True) == WaitUntil(T0 + 0.08 + QUIET)
    assert s.poll(T0 + 0.08 + QUIET, client_has_all=True) == Close()


def test_client_data_during_the_flush_counts_too() -> None:
    s = schedule()
    assert isinstance(s.poll(T0, client_has_all=False), WaitUntil)
    s.client_data(T0 + 0.5)
    assert s.poll(T0 + 0.45, client_has_all=True) == WaitUntil(T0 + 0.5 + QUIET)


def test_a_client_that_never_stops_sending_is_closed_drain_max_after_the_flush() -> None:
    s = schedule()
    flushed = T0 + 1.0
    assert s.poll(T0, client_has_all=False) == WaitUntil(T0 + POLL)
    decision = s.poll(flushed, client_has_all=True)
    polls = 0
    while isinstance(decision, WaitUntil) and polls < 1000:
        assert decision.at <= flushed + DRAIN_MAX
        now = decision.at
        s.client_data(now)  # more data has just arrived every time the timer fires
        decision = s.poll(now, client_has_all=True)
        polls += 1
    assert decision == Close()
    assert now == flushed + DRAIN_MAX
    assert polls > DRAIN_MAX / QUIET / 2


def test_a_client_still_receiving_at_close_flush_max_is_given_up_on_once() -> None:
    s = schedule()
    now = T0
    decision = s.poll(now, client_has_all=False)
    while isinstance(decision, WaitUntil) and not decision.flush_timed_out:
        assert decision.at - T0 < FLUSH_MAX + QUIET
        now = decision.at
        decision = s.poll(now, client_has_all=False)
    assert now >= T0 + FLUSH_MAX
    assert now < T0 + FLUSH_MAX + QUIET
    # gave up on the flush; the client still gets its quiet period, bounded by drain_max
    assert decision == WaitUntil(now + QUIET, flush_timed_out=True)
    assert not s.flushing
    assert s.poll(now + QUIET, client_has_all=False) == Close()


def test_flush_timeout_with_no_quiet_period_closes_at_once() -> None:
    s = CloseSchedule(T0, flush_max=1.0, flush_poll=0.5, quiet=0.0, drain_max=0.0)
    assert s.poll(T0, client_has_all=False) == WaitUntil(T0 + 0.5)
    assert s.poll(T0 + 1.0, client_has_all=False) == Close(flush_timed_out=True)
