"""Rate limits with the clock passed in: the service's TokenSchedule and a
process's Throttle, driven by a simulated loop, so the rate is checked exactly."""

from __future__ import annotations

import heapq

import pytest

from mtt.config import Limits
from mtt.core.rate import Direction, GrantRules, Throttle, TokenSchedule

UP, DOWN = Direction.UP, Direction.DOWN

LIMITS = Limits()
RULES = GrantRules(LIMITS.rate_burst, LIMITS.rate_grants_per_second, LIMITS.rate_min_grant)
BURST, PER_SECOND, MIN_GRANT = RULES.burst, RULES.grants_per_second, RULES.min_grant
RATE = 1_000_000  # bytes/s
GRANT = max(RATE // PER_SECOND, MIN_GRANT)  # what one ask adds beyond the overdraft


class Tunnel:
    """A Pausable that records what its throttle told it."""

    def __init__(self) -> None:
        self.paused: set[int] = set()
        self.events: list[tuple[str, int]] = []

    def throttle_pause(self, direction: int) -> None:
        assert direction not in self.paused
        self.paused.add(direction)
        self.events.append(("pause", direction))

    def throttle_resume(self, direction: int) -> None:
        self.paused.discard(direction)
        self.events.append(("resume", direction))


# -- TokenSchedule -------------------------------------------------------------------------


def test_a_saturating_user_gets_the_rate_to_within_one_grant() -> None:
    """Ask again as soon as each grant is handed out, for a simulated 10 s."""
    schedule = TokenSchedule(RATE, RULES)
    now = 0.0
    handed_out = 0
    while True:
        grant, delay = schedule.reserve(0, now)
        if now + delay > 10.0:
            break
        now += delay
        handed_out += grant
    assert RATE * 10 <= handed_out <= RATE * 10 + GRANT


@pytest.mark.parametrize("rate", [1, 1000, 4096 * 20, 12_345_678])
def test_the_long_run_rate_is_exact_at_any_rate(rate: int) -> None:
    schedule = TokenSchedule(rate, RULES)
    grant = max(rate // PER_SECOND, MIN_GRANT)
    seconds = max(10.0, 100 * grant / rate)  # at least a hundred grants
    now = 0.0
    handed_out = 0
    for _ in range(100_000):
        got, delay = schedule.reserve(0, now)
        if now + delay > seconds:
            break
        now += delay
        handed_out += got
    assert rate * seconds <= handed_out <= rate * seconds + grant


def test_a_quiet_user_may_spend_only_the_burst_at_once() -> None:
    schedule = TokenSchedule(RATE, RULES)
    schedule.reserve(0, 0.0)
    now = 3600.0  # quiet for an hour: no credit beyond BURST
    at_once = 0
    for _ in range(1000):
        grant, delay = schedule.reserve(0, now)
        if delay > 0:
            break
        at_once += grant
    assert at_once <= RATE * BURST + GRANT
    assert at_once >= RATE * BURST


def test_an_overdraft_is_charged_to_the_next_grant() -> None:
    overdraft = 3 * RATE  # one read of three seconds' worth beyond the allowance
    plain, charged = TokenSchedule(RATE, RULES), TokenSchedule(RATE, RULES)
    assert plain.reserve(0, 0.0) == (GRANT, 0.0)
    grant, delay = charged.reserve(overdraft, 0.0)
    assert (grant, delay) == (overdraft + GRANT, 0.0)  # covers the debt, and more
    _, plain_delay = plain.reserve(0, 0.0)
    _, charged_delay = charged.reserve(0, 0.0)
    assert charged_delay - plain_delay == pytest.approx(overdraft / RATE)


def test_a_new_rate_applies_from_the_next_grant() -> None:
    schedule = TokenSchedule(RATE, RULES)
    schedule.reserve(0, 0.0)
    schedule.rate = RATE * 10
    grant, _ = schedule.reserve(0, 0.0)
    assert grant == RATE * 10 // PER_SECOND


def test_the_rules_are_the_callers() -> None:
    """A grant and the burst follow the GrantRules given, not numbers of the schedule's own."""
    schedule = TokenSchedule(RATE, GrantRules(burst=2.0, grants_per_second=4, min_grant=1))
    assert schedule.reserve(0, 0.0) == (RATE // 4, 0.0)
    schedule.reserve(0, 100.0)  # quiet: the clock restarts 2 s back ...
    spent = RATE // 4
    while schedule.reserve(0, 100.0)[1] == 0:
        spent += RATE // 4
    assert spent == 2 * RATE + RATE // 4  # ... so 2 s of rate at once, and the grant due now
    small = TokenSchedule(100, GrantRules(burst=0.0, grants_per_second=4, min_grant=1000))
    assert small.reserve(0, 0.0) == (1000, 0.0)


# -- Throttle ------------------------------------------------------------------------------


def test_a_tunnel_within_its_allowance_runs_on() -> None:
    asks: list[int] = []
    throttle = Throttle(UP, asks.append)
    throttle.granted(10_000)
    tunnel = Tunnel()
    throttle.charge(10_000, tunnel)
    assert (throttle.allowance, asks, tunnel.events) == (0, [], [])


def test_an_overdrawn_tunnel_pauses_once_and_one_ask_covers_the_debt() -> None:
    asks: list[int] = []
    throttle = Throttle(DOWN, asks.append)
    tunnel = Tunnel()
    throttle.charge(5000, tunnel)
    throttle.charge(3000, tunnel)  # the rest of the same read
    assert tunnel.events == [("pause", DOWN)]
    assert asks == [5000]  # one ask in flight at a time
    throttle.granted(5000 + GRANT)
    assert tunnel.events == [("pause", DOWN), ("resume", DOWN)]
    assert throttle.allowance == GRANT - 3000


def test_a_grant_short_of_the_debt_asks_for_the_rest_and_keeps_the_tunnel_paused() -> None:
    asks: list[int] = []
    throttle = Throttle(UP, asks.append)
    tunnel = Tunnel()
    throttle.charge(10_000, tunnel)
    throttle.granted(4000)
    assert asks == [10_000, 6000]
    assert tunnel.paused == {UP}
    throttle.granted(6000)
    assert tunnel.paused == set()
    assert throttle.allowance == 0


def test_tunnels_sharing_a_throttle_pause_and_resume_together() -> None:
    asks: list[int] = []
    throttle = Throttle(UP, asks.append)
    a, b, c = Tunnel(), Tunnel(), Tunnel()
    throttle.charge(1000, a)
    throttle.charge(2000, b)
    throttle.charge(500, c)
    assert asks == [1000]
    throttle.forget(c)  # c closed while paused: it is not resumed
    throttle.granted(3500 + GRANT)
    assert a.events == b.events == [("pause", UP), ("resume", UP)]
    assert c.events == [("pause", UP)]


def test_release_all_resumes_every_paused_tunnel_whatever_the_allowance() -> None:
    throttle = Throttle(UP, lambda want: None)
    a, b = Tunnel(), Tunnel()
    throttle.charge(1000, a)
    throttle.charge(1000, b)
    throttle.release_all()  # the limit was lifted
    assert a.paused == b.paused == set()
    throttle.release_all()
    assert a.events.count(("resume", UP)) == 1


def test_tunnels_sharing_one_throttle_and_schedule_get_the_rate_exactly() -> None:
    """Three tunnels read 16 KiB every millisecond while not paused; asks go
    to a TokenSchedule and their grants arrive when it says. Over a simulated
    10 s the bytes read are the rate to within one grant plus one read each."""
    chunk = 16 * 1024
    seconds = 10.0
    schedule = TokenSchedule(RATE, RULES)
    now = 0.0
    grants: list[tuple[float, int, int]] = []  # (at, order, size) heap
    order = 0

    def ask(want: int) -> None:
        nonlocal order
        grant, delay = schedule.reserve(want, now)
        order += 1
        heapq.heappush(grants, (now + delay, order, grant))

    throttle = Throttle(UP, ask)
    tunnels = [Tunnel() for _ in range(3)]
    read = [0] * len(tunnels)
    tick = 0
    while True:
        now = tick / 1000
        if now > seconds:
            break
        while grants and grants[0][0] <= now:
            throttle.granted(heapq.heappop(grants)[2])
        for i, tunnel in enumerate(tunnels):
            if not tunnel.paused:
                read[i] += chunk
                throttle.charge(chunk, tunnel)
        tick += 1
    total = sum(read)
    # granted by then: the rate times the time, plus the grant in hand; read: that,
    # give or take the unspent allowance and the last read of each tunnel
    assert RATE * seconds - GRANT <= total <= RATE * seconds + GRANT + len(tunnels) * chunk
    assert min(read) > total / len(tunnels) / 2  # none of them starves
