"""format_hostport: every host:port the server and client write reads back with parse_destination."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtt.address import (
    Destination,
    DestinationParser,
    destinations,
    format_hostport,
    parse_destination,
)


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


_TEXTS = [
    "127.0.0.1:443",
    "127.0.0.1:0",
    "127.0.0.1:65535",
    "127.0.0.1:65536",
    "127.0.0.1:00443",
    "127.0.0.1:004430",
    "127.0.0.1:",
    "127.0.0.1:+1",
    "127.0.0.1:-1",
    "127.0.0.1: 1",
    "127.0.0.1:1 ",
    "127.0.0.1:\u0661",  # an Arabic-Indic digit: isdigit, not ASCII
    "127.0.0.1:\u00b2",  # a superscript two: isdigit, not a decimal
    "127.0.0.1::1",
    "127.0.0.1",
    ":443",
    "[::1]:443",
    "[::1]:99999",
    "[::1]",
    "[127.0.0.1]:443",
    "[fe80::1%eth0]:22",
    "::1:443",
    "example.com:80",
    "example.com.:80",
    "-example.com:80",
    "exa mple.com:80",
    "example.com\n:80",
    "a" * 253 + ":80",
    "a" * 254 + ":80",
    "_srv:1",
    "127.0.0.1:443:443",
]


def _outcome(parse: Callable[[str], Destination], text: str) -> Destination | str:
    try:
        return parse(text)
    except ValueError as exc:
        return f"ValueError: {exc}"


@pytest.mark.parametrize("order", ["as listed", "reversed"])
def test_the_parser_of_many_texts_answers_as_parse_destination(order: str) -> None:
    """Each text (and each with every host seen before it) parses, or fails
    with the same message, as parse_destination says: whatever came first."""
    hosts = ["127.0.0.1", "example.com", "[::1]", "example.com\n", "_srv", "a" * 253, ""]
    ports = ["1", "80", "65535", "0", "65536", "", "08", "1x", "\u0661", "123456", " 8"]
    texts = _TEXTS + [f"{h}:{p}" for h in hosts for p in ports]
    if order == "reversed":
        texts.reverse()
    parser = DestinationParser()
    for text in texts * 2:  # the second time round, every valid host is known
        assert _outcome(parser.parse, text) == _outcome(parse_destination, text), text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"\A[\[\]0-9a-z.:%_\- \n]{0,12}:[0-9\u0661+ -]{0,7}\Z"), max_size=20))
def test_the_parser_agrees_on_any_texts(texts: list[str]) -> None:
    parser = DestinationParser()
    for text in texts + texts:
        assert _outcome(parser.parse, text) == _outcome(parse_destination, text), text


def test_destinations_of_one_host_share_its_text() -> None:
    parser = DestinationParser()
    first, second = parser.parse("10.0.0.1:1"), parser.parse("10.0.0.1:2")
    assert (first, second) == (Destination("10.0.0.1", 1), Destination("10.0.0.1", 2))
    assert first.host is second.host


@pytest.mark.parametrize("text", ["example.com\n:80", "example.com\r\n:80", "a\n:1"])
def test_a_host_ending_in_a_newline_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a valid host name or address"):
        parse_destination(text)
    with pytest.raises(ValueError, match="is not a valid host name or address"):
        DestinationParser().parse(text)


def _column_outcome(texts: list[str]) -> list[Destination] | None:
    """What destinations(texts) must give: each text's Destination if every
    text parses and none is in brackets; else None."""
    try:
        parsed = [parse_destination(t) for t in texts]
    except ValueError:
        return None
    return None if any(t.startswith("[") for t in texts) else parsed


def test_a_column_parses_as_each_text_alone() -> None:
    """Each text alone, then the valid ones together, then those with each
    text in turn added in the middle: all or nothing, as parse_destination says."""
    hosts = ["127.0.0.1", "example.com", "[::1]", "example.com\n", "_srv", "a" * 253, ""]
    ports = ["1", "80", "65535", "0", "65536", "", "08", "1x", "\u0661", "123456", " 8"]
    texts = _TEXTS + [f"{h}:{p}" for h in hosts for p in ports]
    for text in texts:
        assert destinations([text]) == _column_outcome([text]), text
    valid = [t for t in texts if _column_outcome([t]) is not None]
    assert len(valid) == 23  # 7 of _TEXTS, and 4 hosts by 4 ports (1, 80, 65535, 08)
    assert destinations(valid) == [parse_destination(t) for t in valid]
    for text in texts:
        column = [*valid[:7], text, *valid[7:]]
        assert destinations(column) == _column_outcome(column), text
    assert destinations([]) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"\A[\[\]0-9a-z.:%_\- \n]{0,12}:[0-9\u0661+ -]{0,7}\Z"), max_size=20))
def test_a_column_agrees_on_any_texts(texts: list[str]) -> None:
    assert destinations(texts) == _column_outcome(texts)


def test_a_column_shares_each_host_text() -> None:
    texts = [f"10.0.0.{i % 2}:{1000 + i}" for i in range(6)]
    parsed = destinations(texts)
    assert parsed == [Destination(f"10.0.0.{i % 2}", 1000 + i) for i in range(6)]
    assert parsed[0].host is parsed[2].host is parsed[4].host
    assert parsed[1].host is parsed[3].host is parsed[5].host


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "example.com", "a" * 253, "[::1]", "", "bad host", "a:b"]
)
@pytest.mark.parametrize("port", ["443", "08", "0", "65536", "", "1x", "\u0661", "123456", "80:90"])
def test_a_column_of_one_host_parses_as_each_text_alone(host: str, port: str) -> None:
    """Every text of one host: the ports are sliced off after it, not split
    (mtt.address.destinations); the answer must not change."""
    column = [f"{host}:{p}" for p in ("1", "80", port, "65535")]
    assert destinations(column) == _column_outcome(column), column
    assert destinations(column[2:3]) == _column_outcome(column[2:3]), column


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"\A[\[\]0-9a-z.:%_\- ]{0,8}\Z"),
    st.lists(st.from_regex(r"\A[0-9\u0661:+ -]{0,7}\Z"), min_size=1, max_size=20),
)
def test_a_column_of_one_host_agrees_on_any_ports(host: str, ports: list[str]) -> None:
    texts = [f"{host}:{port}" for port in ports]
    assert destinations(texts) == _column_outcome(texts)
