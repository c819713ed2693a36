"""Admission against server-wide limits, each at its boundary, with the clock passed in."""

from __future__ import annotations

from mtt.core.admission import AdmissionBook, expired, over_quota
from mtt.core.users import UserLimits

NOW = 1_700_000_000.0
PATH = "/u"


def test_a_user_without_limits_is_always_admitted() -> None:
    book = AdmissionBook()
    for i in range(100):
        assert book.refusal(PATH, UserLimits(), f"10.0.0.{i}", NOW, quota_used=10**18) is None
        book.admit(0, PATH, f"10.0.0.{i}")
    assert book.open_tunnels(PATH) == 100


def test_expire_refuses_from_that_second_on() -> None:
    limits = UserLimits(expire=int(NOW))
    book = AdmissionBook()
    assert book.refusal(PATH, limits, "10.0.0.1", NOW - 0.001) is None
    assert book.refusal(PATH, limits, "10.0.0.1", NOW) == "expired"
    assert book.refusal(PATH, limits, "10.0.0.1", NOW + 1) == "expired"
    assert not expired(UserLimits(expire=0), NOW)  # 0 is never


def test_quota_used_up_exactly_is_refused_and_one_byte_left_is_admitted() -> None:
    limits = UserLimits(quota=1000)
    book = AdmissionBook()
    assert book.refusal(PATH, limits, "10.0.0.1", NOW, quota_used=999) is None
    assert (
        book.refusal(PATH, limits, "10.0.0.1", NOW, quota_used=1000)
        == "over quota (1000 of 1000 bytes)"
    )
    assert (
        book.refusal(PATH, limits, "10.0.0.1", NOW, quota_used=5000)
        == "over quota (5000 of 1000 bytes)"
    )
    assert not over_quota(UserLimits(quota=0), 10**18)  # 0 is no quota


def test_expired_is_said_before_over_quota() -> None:
    limits = UserLimits(quota=1, expire=int(NOW))
    assert AdmissionBook().refusal(PATH, limits, "10.0.0.1", NOW, quota_used=1) == "expired"


def test_max_tunnels_counts_every_agent_and_frees_on_release() -> None:
    limits = UserLimits(max_tunnels=2)
    book = AdmissionBook()
    book.admit(0, PATH, "10.0.0.1")
    assert book.refusal(PATH, limits, "10.0.0.1", NOW) is None  # one left
    book.admit(1, PATH, "10.0.0.2")  # another worker
    assert book.refusal(PATH, limits, "10.0.0.3", NOW) == "at its limit of 2 tunnels"
    assert book.refusal(PATH, limits, "10.0.0.1", NOW) == "at its limit of 2 tunnels"
    book.release(1, PATH, "10.0.0.2")
    assert book.refusal(PATH, limits, "10.0.0.3", NOW) is None


def test_max_tunnels_is_per_user() -> None:
    limits = UserLimits(max_tunnels=1)
    book = AdmissionBook()
    book.admit(0, "/other", "10.0.0.1")
    assert book.refusal(PATH, limits, "10.0.0.1", NOW) is None


def test_max_ips_admits_the_same_address_again_but_not_a_new_one() -> None:
    limits = UserLimits(max_ips=2)
    book = AdmissionBook()
    book.admit(0, PATH, "10.0.0.1")
    assert book.refusal(PATH, limits, "10.0.0.2", NOW) is None  # a second address
    book.admit(1, PATH, "10.0.0.2")
    assert book.refusal(PATH, limits, "10.0.0.3", NOW) == "at its limit of 2 client addresses"
    for agent in range(3):  # the same addresses again, through any worker
        assert book.refusal(PATH, limits, "10.0.0.1", NOW) is None
        book.admit(agent, PATH, "10.0.0.1")
    assert book.refusal(PATH, limits, "10.0.0.2", NOW) is None


def test_an_address_counts_until_its_last_tunnel_closes() -> None:
    limits = UserLimits(max_ips=1)
    book = AdmissionBook()
    book.admit(0, PATH, "10.0.0.1")
    book.admit(0, PATH, "10.0.0.1")
    book.release(0, PATH, "10.0.0.1")
    assert book.refusal(PATH, limits, "10.0.0.2", NOW) == "at its limit of 1 client addresses"
    book.release(0, PATH, "10.0.0.1")
    assert book.refusal(PATH, limits, "10.0.0.2", NOW) is None
    assert len(book) == 0  # nothing kept for a user with nothing open


def test_an_address_open_through_two_agents_counts_once() -> None:
    limits = UserLimits(max_ips=1)
    book = AdmissionBook()
    book.admit(0, PATH, "10.0.0.1")
    book.admit(1, PATH, "10.0.0.1")
    assert book.refusal(PATH, limits, "10.0.0.1", NOW) is None
    assert book.refusal(PATH, limits, "10.0.0.2", NOW) is not None
    book.release(0, PATH, "10.0.0.1")
    assert book.refusal(PATH, limits, "10.0.0.2", NOW) is not None  # still open through agent 1


def test_a_dead_agent_takes_its_tunnels_with_it() -> None:
    limits = UserLimits(max_tunnels=2, max_ips=1)
    book = AdmissionBook()
    book.admit(1, PATH, "10.0.0.1")
    book.admit(1, PATH, "10.0.0.1")
    book.admit(2, "/other", "10.0.0.9")
    assert book.refusal(PATH, limits, "10.0.0.1", NOW) == "at its limit of 2 tunnels"
    book.agent_gone(1)
    assert book.open_tunnels(PATH) == 0
    assert book.refusal(PATH, limits, "10.0.0.2", NOW) is None
    assert book.open_tunnels("/other") == 1
    book.release(1, PATH, "10.0.0.1")  # a late close of a tunnel already forgotten
    assert book.open_tunnels(PATH) == 0
