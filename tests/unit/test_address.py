"""format_hostport: every host:port the server and client write reads back with parse_destination."""

from __future__ import annotations

import pytest

from mtt.address import Destination, format_hostport, parse_destination


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 443, "127.0.0.1:443"),
        ("::1", 443, "[::1]:443"),
        ("2001:db8::1", 8080, "[2001:db8::1]:8080"),
        ("fe80::1%eth0", 22, "[fe80::1%eth0]:22"),
        ("example.com", 1, "example.com:1"),
        ("localhost", 65535, "localhost:65535"),
    ],
)
def test_format_and_parse_round_trip(host: str, port: int, text: str) -> None:
    assert format_hostport(host, port) == text
    assert parse_destination(text) == Destination(host, port)
    assert str(Destination(host, port)) == text


def test_bracketed_host_is_kept() -> None:
    """A host as a listen flag writes it ([v6]) is not bracketed twice."""
    assert format_hostport("[::1]", 80) == "[::1]:80"
    assert parse_destination(format_hostport("[::1]", 80)) == Destination("::1", 80)


def test_empty_host_and_string_port() -> None:
    """`:port` listens everywhere (Go's form); SIP003 hands the port over as text."""
    assert format_hostport("", 8443) == ":8443"
    assert parse_destination(":8443", allow_empty_host=True) == Destination("", 8443)
    assert format_hostport("::", "1080") == "[::]:1080"
