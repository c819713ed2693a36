"""Which address is the client's: -trusted-proxy and X-Forwarded-For / X-Real-IP."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtt.config import Limits
from mtt.errors import ConfigError
from mtt.wire.client_address import TrustedProxies, forwarded_ip

TRUSTED = TrustedProxies(["10.0.0.0/8", "192.168.1.1", "2001:db8::/32"])
HOPS = Limits().max_forwarded_hops


def client_of(
    peer: str, headers: list[tuple[bytes, bytes]], trusted: TrustedProxies = TRUSTED
) -> str:
    """The client for a request, looking at as many hops as the server does."""
    return trusted.real_client(peer, headers, max_hops=HOPS)


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", value.encode()) for value in values]


def test_contains() -> None:
    assert TRUSTED.contains("10.9.8.7")
    assert TRUSTED.contains("192.168.1.1")
    assert not TRUSTED.contains("192.168.1.2")
    assert TRUSTED.contains("2001:db8::1")
    assert TRUSTED.contains("::ffff:10.0.0.1")  # IPv4 peer on a dual-stack listener
    assert not TRUSTED.contains("")  # Unix socket, not trusted unless unix: is given
    assert not TRUSTED.contains("garbage")
    assert TrustedProxies(["unix:"]).contains("")


def test_empty_is_false() -> None:
    assert not TrustedProxies()
    assert TrustedProxies(["unix:"])


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "example.com", "", "1.2.3.4/8/8"])
def test_bad_cidr_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="-trusted-proxy"):
        TrustedProxies([bad])


def test_untrusted_peer_headers_are_ignored() -> None:
    headers = [*xff("1.1.1.1"), (b"x-real-ip", b"2.2.2.2")]
    assert client_of("203.0.113.9", headers) == "203.0.113.9"


def test_walks_from_the_right_skipping_trusted_hops() -> None:
    # The client may send anything left of what the first trusted proxy appended.
    headers = xff("6.6.6.6, 198.51.100.7", "10.1.1.1,10.2.2.2")
    assert client_of("10.0.0.1", headers) == "198.51.100.7"


def test_all_hops_trusted_gives_the_leftmost() -> None:
    assert client_of("10.0.0.1", xff("10.5.5.5, 10.6.6.6")) == "10.5.5.5"


def test_garbage_entry_stops_the_walk() -> None:
    assert client_of("10.0.0.1", xff("1.1.1.1, unknown, 10.3.3.3")) == "10.3.3.3"
    assert client_of("10.0.0.1", xff("bogus")) == "10.0.0.1"


def test_only_the_last_max_hops_entries_are_looked_at() -> None:
    trusted_hops = ", ".join(f"10.0.0.{n}" for n in range(1, HOPS))
    headers = xff(f"203.0.113.1, 198.51.100.2, {trusted_hops}")
    assert client_of("10.9.9.9", headers) == "198.51.100.2"
    assert TRUSTED.real_client("10.9.9.9", headers, max_hops=HOPS - 1) == "10.0.0.1"
    assert TRUSTED.real_client("10.9.9.9", headers, max_hops=HOPS + 1) == "198.51.100.2"


def test_forwarded_for_wins_over_real_ip() -> None:
    headers = [(b"x-real-ip", b"2.2.2.2"), *xff("1.1.1.1")]
    assert client_of("10.0.0.1", headers) == "1.1.1.1"


def test_real_ip_when_no_forwarded_for() -> None:
    assert client_of("10.0.0.1", [(b"x-real-ip", b" 2.2.2.2 ")]) == "2.2.2.2"
    assert client_of("10.0.0.1", [(b"x-real-ip", b"nope")]) == "10.0.0.1"
    two = [(b"x-real-ip", b"2.2.2.2"), (b"x-real-ip", b"3.3.3.3")]
    assert client_of("10.0.0.1", two) == "10.0.0.1"


def test_unix_peer_when_trusted() -> None:
    trusted = TrustedProxies(["unix:"])
    assert client_of("", xff("192.0.2.3"), trusted) == "192.0.2.3"
    assert client_of("", xff("192.0.2.3")) == ""


@pytest.mark.parametrize(
    ("entry", "ip"),
    [
        (b"1.2.3.4", "1.2.3.4"),
        (b" 1.2.3.4:5678 ", "1.2.3.4"),
        (b"2001:db8::1", "2001:db8::1"),
        (b"[2001:db8::1]:443", "2001:db8::1"),
        (b"[2001:db8::1]", "2001:db8::1"),
        (b"[2001:db8::1", None),
        (b"fe80::1%eth0", None),
        (b"unknown", None),
        (b"", None),
        (b"\xff", None),
    ],
)
def test_forwarded_ip(entry: bytes, ip: str | None) -> None:
    assert forwarded_ip(entry) == ip


@given(st.lists(st.binary(max_size=80), max_size=5), st.sampled_from(["10.0.0.1", "1.1.1.1", ""]))
def test_any_headers_give_a_peer_or_an_ip(values: list[bytes], peer: str) -> None:
    headers = [(b"x-forwarded-for", v) for v in values] + [(b"x-real-ip", b"".join(values))]
    client = client_of(peer, headers)
    assert client == peer or forwarded_ip(client.encode()) == client
