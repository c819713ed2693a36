"""The node's side of max_tunnels and max_ips across nodes (mtt.core.leases):
which lease a closing tunnel lets go, what a renewal carries, when the store
is asked again during an outage. The clock is passed in."""

from __future__ import annotations

from mtt.core.leases import (
    LeaseLedger,
    Outage,
    SharedRefusal,
    lease_ip,
    lease_name,
    shared_limited,
    unchecked_reason,
)
from mtt.core.users import UserLimits

PATH = "/u"


def test_only_max_tunnels_and_max_ips_need_the_count_across_nodes() -> None:
    assert shared_limited(UserLimits(max_tunnels=1))
    assert shared_limited(UserLimits(max_ips=1))
    assert not shared_limited(UserLimits())
    assert not shared_limited(UserLimits(rate=1000, quota=10, expire=1))


def test_a_lease_name_ends_in_the_client_address_whatever_its_form() -> None:
    for ip in ("127.0.0.1", "2001:db8::1", "::ffff:10.0.0.1", ""):
        name = lease_name("n0de", 7, ip)
        assert name.startswith("n0de 7 ")
        assert lease_ip(name) == ip


def test_names_are_unique_per_node() -> None:
    ledger = LeaseLedger("a")
    names = {ledger.take(0, PATH, "10.0.0.1") for _ in range(100)}
    assert len(names) == 100
    assert all(name.startswith("a ") for name in names)


def test_a_renewal_carries_admitted_leases_only() -> None:
    ledger = LeaseLedger("a")
    one = ledger.take(0, PATH, "10.0.0.1")
    ledger.admitted(one)
    deciding = ledger.take(1, PATH, "10.0.0.2")
    assert ledger.held() == {PATH: [one]}  # the one being decided is the admission's to add
    ledger.admitted(deciding)
    assert sorted(ledger.held()[PATH]) == sorted([one, deciding])


def test_a_refused_admission_leaves_nothing() -> None:
    ledger = LeaseLedger("a")
    name = ledger.take(0, PATH, "10.0.0.1")
    ledger.drop(0, PATH, "10.0.0.1", name)
    assert len(ledger) == 0
    assert ledger.held() == {}
    assert ledger.give_back(0, PATH, "10.0.0.1") is None


def test_a_closing_tunnel_gives_back_one_lease_of_its_key() -> None:
    ledger = LeaseLedger("a")
    first = ledger.take(0, PATH, "10.0.0.1")
    second = ledger.take(0, PATH, "10.0.0.1")
    other = ledger.take(0, PATH, "10.0.0.2")
    for name in (first, second, other):
        ledger.admitted(name)
    assert ledger.give_back(0, PATH, "10.0.0.1") in (first, second)
    assert ledger.give_back(0, PATH, "10.0.0.1") in (first, second)
    assert ledger.give_back(0, PATH, "10.0.0.1") is None  # none left for that address
    assert ledger.held() == {PATH: [other]}
    assert ledger.give_back(1, PATH, "10.0.0.2") is None  # another worker's key


def test_a_closing_tunnel_never_takes_a_lease_still_being_decided() -> None:
    ledger = LeaseLedger("a")
    slow = ledger.take(0, PATH, "10.0.0.1")  # the admission still waits for the store
    fast = ledger.take(0, PATH, "10.0.0.1")
    ledger.admitted(fast)
    assert ledger.give_back(0, PATH, "10.0.0.1") == fast
    ledger.admitted(slow)
    assert ledger.held() == {PATH: [slow]}


def test_a_tunnel_admitted_before_its_user_had_the_limits_gives_back_nothing() -> None:
    assert LeaseLedger("a").give_back(0, PATH, "10.0.0.1") is None


def test_a_dead_worker_releases_its_leases_only() -> None:
    ledger = LeaseLedger("a")
    mine = [ledger.take(1, PATH, "10.0.0.1"), ledger.take(1, "/v", "10.0.0.1")]
    kept = ledger.take(2, PATH, "10.0.0.1")
    for name in (*mine, kept):
        ledger.admitted(name)
    assert ledger.agent_gone(1) == {PATH: [mine[0]], "/v": [mine[1]]}
    assert ledger.held() == {PATH: [kept]}
    assert ledger.agent_gone(1) == {}


def test_clear_hands_over_everything_once() -> None:
    ledger = LeaseLedger("a")
    admitted = ledger.take(0, PATH, "10.0.0.1")
    ledger.admitted(admitted)
    deciding = ledger.take(0, "/v", "10.0.0.2")
    assert ledger.clear() == {PATH: [admitted], "/v": [deciding]}
    assert ledger.clear() == {}
    assert len(ledger) == 0


def test_refusals_read_like_the_nodes_own_and_say_across_nodes() -> None:
    limits = UserLimits(max_tunnels=2, max_ips=1)
    assert SharedRefusal("tunnels", 2).reason(limits) == "at its limit of 2 tunnels across nodes"
    assert (
        SharedRefusal("ips", 1).reason(limits) == "at its limit of 1 client addresses across nodes"
    )
    reason = unchecked_reason("Redis: no answer within 5 s")
    assert "Redis: no answer within 5 s" in reason
    assert "-redis-limits-when-down closed" in reason


def test_the_store_is_asked_while_it_answers() -> None:
    outage = Outage(retry=1.0)
    assert outage.due(0.0) and outage.due(0.0)  # no outage: every admission asks
    assert not outage.answered()  # no outage ended


def test_an_outage_is_said_once_and_retried_by_one_admission_at_a_time() -> None:
    outage = Outage(retry=1.0)
    assert outage.due(10.0)
    assert outage.failed(15.0)  # begins an outage: one log line
    assert not outage.due(15.5)  # the others get the policy's answer at once
    assert outage.due(16.0)  # one retry
    assert not outage.due(16.0)  # ... while it is out, no other
    assert not outage.due(30.0)
    assert not outage.failed(21.0)  # still the same outage: no second line
    assert not outage.due(21.9)
    assert outage.due(22.0)
    assert outage.answered()  # the outage ends: one line
    assert outage.due(22.0) and outage.due(22.0)
    assert not outage.answered()


def test_an_abandoned_retry_lets_the_next_one_go() -> None:
    outage = Outage(retry=1.0)
    outage.failed(0.0)
    assert outage.due(1.0)
    outage.abandoned()
    assert outage.due(1.0)
