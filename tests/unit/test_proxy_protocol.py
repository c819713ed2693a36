"""The PROXY protocol parser: the examples of haproxy's proxy-protocol.txt,
every refusal with its reason, splits that never matter, and garbage that
only ever raises ProtocolError."""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtt.config import Limits
from mtt.errors import ProtocolError
from mtt.wire import proxy_header
from mtt.wire.proxy_header import NEED_DATA, V2_SIGNATURE, NeedData, ProxyHeader

MAX_V2_HEADER = Limits().max_proxy_v2_header  # the cap the PROXY listener gives the parser


def parse_header(data: bytes) -> ProxyHeader | NeedData:
    return proxy_header.parse_header(data, max_v2_header=MAX_V2_HEADER)


def new_reader() -> proxy_header.ProxyHeaderReader:
    return proxy_header.ProxyHeaderReader(max_v2_header=MAX_V2_HEADER)


SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def v2(command: int = 1, family: int = 0x11, block: bytes | None = None, version: int = 2) -> bytes:
    if block is None:
        block = socket.inet_aton("192.0.2.1") + socket.inet_aton("10.0.0.1")
        block += struct.pack("!HH", 51000, 443)
    ver_cmd = bytes([version << 4 | command, family])
    return V2_SIGNATURE + ver_cmd + struct.pack("!H", len(block)) + block


# -- v1 (§2.1) ---------------------------------------------------------------


def test_v1_tcp4() -> None:
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    header = parse_header(data)
    assert header == ProxyHeader(1, ("192.168.0.1", 56324), 47)
    assert data[header.length :] == b"GET / HTTP/1.1\r\n"


def test_v1_tcp6_is_canonicalised() -> None:
    header = parse_header(b"PROXY TCP6 2001:DB8:0:0::1 ::1 1 65535\r\n")
    assert isinstance(header, ProxyHeader)
    assert header.source == ("2001:db8::1", 1)


@pytest.mark.parametrize(
    "line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"]
)
def test_v1_unknown_names_no_client(line: bytes) -> None:
    assert parse_header(line) == ProxyHeader(1, None, len(line))


def test_v1_worst_case_fits_107_bytes() -> None:
    six = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {six} {six} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert isinstance(parse_header(line), ProxyHeader)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00", "not a PROXY protocol header"),
        (b"PROXZ", "not a PROXY protocol header"),
        (b"PROXY " + b"x" * 120, "longer than 107"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "6 fields"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "v1 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7 1 2\r\n", "v1 address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "v1 port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "v1 port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "v1 port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa3\r\n", "v1 port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r\n", "v1 port"),
    ],
)
def test_v1_refusals(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_header(data)


def test_v1_waits_for_the_line_end() -> None:
    assert parse_header(b"") is NEED_DATA
    assert parse_header(b"PRO") is NEED_DATA
    assert parse_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is NEED_DATA


# -- v2 (§2.2) ---------------------------------------------------------------


def test_v2_inet() -> None:
    data = v2() + b"\x16\x03\x01"
    header = parse_header(data)
    assert header == ProxyHeader(2, ("192.0.2.1", 51000), 28)
    assert data[header.length :] == b"\x16\x03\x01"


def test_v2_inet6_with_tlvs_skipped() -> None:
    block = socket.inet_pton(socket.AF_INET6, "2001:db8::5") + bytes(16)
    block += struct.pack("!HH", 1234, 443) + b"\x01\x00\x02h2" + b"\x05\x00\x04abcd"
    assert parse_header(v2(family=0x21, block=block)) == ProxyHeader(
        2, ("2001:db8::5", 1234), 16 + len(block)
    )


@pytest.mark.parametrize(
    "data",
    [
        v2(command=0),  # LOCAL: a health check; the addresses are ignored
        v2(command=0, family=0x00, block=b""),
        v2(family=0x00, block=b""),  # UNSPEC
        v2(family=0x31, block=b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")),
        v2(family=0x10, block=bytes(12)),  # INET, transport UNSPEC
    ],
    ids=["local", "local-unspec", "unspec", "unix", "inet-unspec-transport"],
)
def test_v2_without_a_client_address(data: bytes) -> None:
    assert parse_header(data) == ProxyHeader(2, None, len(data))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (v2(version=1), "version 1"),
        (v2(command=2), "command 2"),
        (v2(family=0x41), "unknown"),
        (v2(family=0x13), "unknown"),
        (v2(family=0x12), "datagram"),
        (v2(block=bytes(11)), "too short"),
        (v2(family=0x21), "too short"),
        (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_HEADER), "more than"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "not a PROXY protocol header"),
    ],
)
def test_v2_refusals(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_header(data)


def test_v2_cap_is_the_callers() -> None:
    data = v2(block=socket.inet_aton("192.0.2.1") * 2 + struct.pack("!HH", 1, 2) + bytes(20))
    header = proxy_header.parse_header(data, max_v2_header=len(data))
    assert header == ProxyHeader(2, ("192.0.2.1", 1), len(data))
    with pytest.raises(
        ProtocolError, match=f"v2 header of {len(data)} bytes, more than {len(data) - 1}"
    ):
        proxy_header.parse_header(data, max_v2_header=len(data) - 1)


def test_v2_waits_for_the_whole_block() -> None:
    data = v2()
    for n in range(len(data)):
        assert parse_header(data[:n]) is NEED_DATA


def test_reader_keeps_what_follows() -> None:
    reader = new_reader()
    data = v2() + b"hello"
    for i in range(len(data) - 6):
        assert reader.feed(data[i : i + 1]) is NEED_DATA
    assert isinstance(reader.feed(data[len(data) - 6 :]), ProxyHeader)
    assert reader.remainder == b"hello"


# -- properties --------------------------------------------------------------

headers = st.sampled_from(
    [
        b"PROXY TCP4 192.0.2.1 10.0.0.1 51000 443\r\n",
        b"PROXY TCP6 2001:db8::1 ::1 7 8\r\n",
        b"PROXY UNKNOWN\r\n",
        v2(),
        v2(command=0),
    ]
)


@SETTINGS
@given(header=headers, tail=st.binary(max_size=64), cuts=st.lists(st.integers(0, 200)))
def test_splits_never_matter(header: bytes, tail: bytes, cuts: list[int]) -> None:
    data = header + tail
    expected = parse_header(data)
    reader = new_reader()
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    result = None
    for start, end in itertools.pairwise(points):
        result = reader.feed(data[start:end])
        if isinstance(result, ProxyHeader):
            assert data[end - len(reader.remainder) :] == data[expected.length :]  # type: ignore[union-attr]
            break
    assert result == expected


@SETTINGS
@given(st.binary(max_size=300))
def test_garbage_only_raises_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_header(data)


@SETTINGS
@given(
    prefix=st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]),
    body=st.binary(max_size=300),
)
def test_near_misses_only_raise_protocol_error(prefix: bytes, body: bytes) -> None:
    try:
        result = parse_header(prefix + body)
    except ProtocolError:
        return
    if isinstance(result, ProxyHeader):
        assert result.length <= len(prefix + body)
        assert result.length <= MAX_V2_HEADER


@SETTINGS
@given(text=st.text(alphabet="PROXYTCP46UNKW 0123456789.:abcdef\r\n%", max_size=110))
def test_v1_alphabet_only_raises_protocol_error(text: str) -> None:
    with contextlib.suppress(ProtocolError):
        parse_header(b"PROXY " + text.encode())
