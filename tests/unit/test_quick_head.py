"""The quick parse of an upgrade's head: the heads real clients send take it,
and every head it accepts is the one h11 reads from the same bytes."""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtt.wire.quick_head import quick_head
from mtt.wire.request_head import RequestHead

MAX_HEAD = 16 * 1024
SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GO_CLIENT = (  # gorilla/websocket's Dialer, as mtt-client and v2ray-plugin send it
    b"GET /tunnel HTTP/1.1\r\nHost: cdn.example.com\r\nUser-Agent: Go-http-client/1.1\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Protocol: smux_on\r\nSec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n\r\n"
)
BROWSER = (
    b"GET /ws?ed=2048 HTTP/1.1\r\nHost: cdn.example.com:8443\r\nConnection: Upgrade\r\n"
    b"Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)"
    b" AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\n"
    b"Upgrade: websocket\r\nOrigin: https://cdn.example.com:8443\r\n"
    b"Sec-WebSocket-Version: 13\r\nAccept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
)


def h11_head(data: bytes) -> tuple[RequestHead, bytes] | None:
    """What h11 makes of data: the first request's head and the bytes after it
    (None if it asks for more or refuses)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        conn.receive_data(data)
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    head = RequestHead(event.method, event.target, event.http_version, list(event.headers))
    return head, bytes(conn.trailing_data[0])


@pytest.mark.parametrize("data", [GO_CLIENT, BROWSER, GO_CLIENT + b"\x82\x05hello"])
def test_real_clients_heads_are_read_as_h11_reads_them(data: bytes) -> None:
    quick = quick_head(data, MAX_HEAD)
    assert quick is not None
    head, end = quick
    assert (head, data[end:]) == h11_head(data)


@pytest.mark.parametrize(
    "data",
    [
        GO_CLIENT.replace(b"GET", b"POST"),
        GO_CLIENT.replace(b"HTTP/1.1", b"HTTP/1.0"),
        GO_CLIENT.replace(b"GET /tunnel", b"GET http://cdn.example.com/tunnel"),
        GO_CLIENT.replace(b"\r\n", b"\n"),
        GO_CLIENT.replace(b"\r\nUser-Agent", b"\r\n\tfolded\r\nUser-Agent"),
        GO_CLIENT.replace(b"Host: cdn.example.com\r\n", b""),
        GO_CLIENT.replace(b"Host: cdn.example.com\r\n", b"Host: a\r\nHost: b\r\n"),
        GO_CLIENT.replace(
            b"Upgrade: websocket\r\n", b"Upgrade: websocket\r\nContent-Length: 0\r\n"
        ),
        GO_CLIENT.replace(b"Upgrade: websocket\r\n", b"Transfer-Encoding: chunked\r\n"),
        GO_CLIENT.replace(b"User-Agent:", b"User Agent:"),
        GO_CLIENT.replace(b"Go-http-client/1.1", b"Go\x00client"),
        GO_CLIENT[:-2],  # not complete yet
        b"\r\n" + GO_CLIENT,
    ],
)
def test_other_heads_are_left_to_h11(data: bytes) -> None:
    assert quick_head(data, MAX_HEAD) is None


def test_a_head_past_the_bound_is_left_to_h11() -> None:
    assert quick_head(GO_CLIENT, len(GO_CLIENT) - 1) is None
    assert quick_head(GO_CLIENT, len(GO_CLIENT)) is not None


_GOOD_NAMES = [b"Upgrade", b"X-Y", b"a", b"!#$%&'*+-.^_`|~", b"Sec-WebSocket-Key"]
_NAMES = st.sampled_from(_GOOD_NAMES * 8 + [b"hOsT", b"Content-Length", b"Bad Name", b"", b"X\x80"])
_GOOD_VALUES = st.binary(max_size=12).map(
    lambda raw: bytes(b for b in raw if b == 9 or 32 <= b <= 126 or b >= 128)
)
_VALUES = st.one_of(
    _GOOD_VALUES,
    _GOOD_VALUES,
    _GOOD_VALUES,
    st.binary(max_size=6),
    st.sampled_from([b" spaced ", b"\tx\t", b"a  b", b"\xff\x80", b"x\r\ny", b"x\x7f"]),
)
_ENDS = st.sampled_from([b"\r\n"] * 40 + [b"\n", b"\r", b" \r\n"])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """Heads near the quick parse's edges: mostly good shapes, some bytes off."""
    method = draw(st.sampled_from([b"GET"] * 6 + [b"POST", b"get"]))
    target = draw(st.sampled_from([b"/", b"/p", b"/a%20b?x=1"] * 3 + [b"*", b"/\x7f", b"/\xff"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2"]))
    data = method + b" " + target + b" " + version + draw(_ENDS)
    fields = draw(st.lists(st.tuples(_NAMES, _VALUES, _ENDS), max_size=5))
    if draw(st.integers(0, 4)):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b"example.com", b"\r\n"))
    for name, value, end in fields:
        data += name + b":" + value + end
    return data + draw(_ENDS) + draw(st.binary(max_size=8))


@SETTINGS
@given(heads())
def test_what_the_quick_parse_accepts_h11_reads_the_same(data: bytes) -> None:
    quick = quick_head(data, MAX_HEAD)
    if quick is not None:
        head, end = quick
        assert (head, data[end:]) == h11_head(data)
