"""The Mux.Cool codec against frames written out byte by byte from the layout
of v2ray's frame.go (docs/protocol.md §11), and every refusal it makes."""

from __future__ import annotations

import re

import pytest

from mtt.errors import MuxCoolProtocolError
from mtt.muxcool import (
    OPTION_DATA,
    OPTION_ERROR,
    AddressType,
    Frame,
    FrameDecoder,
    Network,
    Status,
    Target,
    encode_data,
    encode_end,
    encode_frame,
)


def wire(meta_hex: str, data: bytes | None = None, extra: bytes = b"") -> bytes:
    """A frame spelled out: metadata length, metadata, then length + data if any."""
    meta = bytes.fromhex(meta_hex) + extra
    out = len(meta).to_bytes(2, "big") + meta
    if data is not None:
        out += len(data).to_bytes(2, "big") + data
    return out


# What v2ray-plugin's client sends first: New, id 1, Data, TCP, port 0 (its
# dokodemo-door names no port), IPv4 127.0.0.1, then 3 bytes of data.
NEW_IPV4 = wire("0001 01 01 01 0000 01 7f000001", b"abc")
# New, id 2, no data, TCP, port 443, domain "v2fly.org".
NEW_DOMAIN = wire("0002 01 00 01 01bb 02 09", extra=b"v2fly.org")
# New, id 3, Data, TCP, port 18374, IPv6 ::1, 1 byte.
NEW_IPV6 = wire("0003 01 01 01 47c6 03" + "00" * 15 + "01", b"x")
KEEP = wire("0001 02 01", b"efgh")
END = wire("0001 03 00")
END_ERROR = wire("0003 03 02")
KEEPALIVE = wire("1234 04 01", b"zz")


def decode(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    assert decoder.pending == 0
    return frames


def test_new_frames_carry_port_then_address_in_muxcools_numbering() -> None:
    frames = decode(NEW_IPV4 + NEW_DOMAIN + NEW_IPV6)
    assert frames == [
        Frame(1, Status.NEW, OPTION_DATA, Target(Network.TCP, 0, AddressType.IPV4, b"\x7f\0\0\1"),
              payload=b"abc"),
        Frame(2, Status.NEW, 0, Target(Network.TCP, 443, AddressType.DOMAIN, b"v2fly.org")),
        Frame(3, Status.NEW, OPTION_DATA,
              Target(Network.TCP, 18374, AddressType.IPV6, bytes(15) + b"\x01"), payload=b"x"),
    ]  # fmt: skip
    assert [f.target.host() for f in frames if f.target] == ["127.0.0.1", "v2fly.org", "::1"]


def test_keep_end_and_keepalive() -> None:
    assert decode(KEEP + END + END_ERROR + KEEPALIVE) == [
        Frame(1, Status.KEEP, OPTION_DATA, payload=b"efgh"),
        Frame(1, Status.END, 0),
        Frame(3, Status.END, OPTION_ERROR),
        Frame(0x1234, Status.KEEPALIVE, OPTION_DATA, payload=b"zz"),
    ]


def test_encoder_writes_those_bytes() -> None:
    for data in (NEW_IPV4, NEW_DOMAIN, NEW_IPV6, KEEP, END, END_ERROR, KEEPALIVE):
        (frame,) = decode(data)
        assert encode_frame(frame) == data
    assert encode_data(1, b"efgh") == KEEP
    assert encode_end(1) == END
    assert encode_end(3, error=True) == END_ERROR


def test_metadata_after_the_fields_is_kept_as_extra() -> None:
    """Xray's XUDP: a UDP New carries an 8-byte GlobalID after the address, and
    its Keep frames a UDP address; the metadata length says where they end."""
    global_id = bytes(range(1, 9))
    xudp_new = wire("0005 01 01 02 0035 01 08080808", b"p", extra=global_id)
    xudp_keep = wire("0005 02 01 02 0035 01 08080808", b"q")
    new, keep = decode(xudp_new + xudp_keep)
    assert new.target == Target(Network.UDP, 53, AddressType.IPV4, b"\x08" * 4)
    assert (new.extra, new.payload) == (global_id, b"p")
    assert (keep.status, keep.extra, keep.payload) == (
        Status.KEEP,
        bytes.fromhex("02 0035 01 08080808"),
        b"q",
    )


def test_data_of_length_zero_is_an_empty_payload() -> None:
    (frame,) = decode(wire("0001 02 01", b""))
    assert frame.has_data and frame.payload == b""


def test_option_bits_v2ray_does_not_know_are_kept_and_ignored() -> None:
    (frame,) = decode(wire("0001 02 f0"))
    assert (frame.option, frame.has_data) == (0xF0, False)


def test_a_frame_in_pieces_waits_for_its_last_byte() -> None:
    decoder = FrameDecoder()
    data = NEW_IPV4 + KEEP
    for i in range(len(NEW_IPV4) - 1):
        assert decoder.feed(data[i : i + 1]) == []
    assert [f.status for f in decoder.feed(data[len(NEW_IPV4) - 1 :])] == [Status.NEW, Status.KEEP]
    assert decoder.pending == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes.fromhex("0201"), "metadata of 513 bytes (at most 512)"),
        (wire("000102"), "metadata of 3 bytes (at least 4)"),
        (wire("0001 05 00"), "unknown status 0x05"),
        (wire("0001 00 00"), "unknown status 0x00"),
        (wire("0001 01 00 01 0050"), "New metadata of 7 bytes (at least 8)"),
        (wire("0001 01 00 03 0050 01"), "unknown network 0x03"),
        (wire("0001 01 00 01 0050 04"), "unknown address type 0x04"),
        (wire("0001 01 00 01 0050 02"), "ends before the domain's length"),
        (wire("0001 01 00 01 0050 02 05 6162"), "ends inside the DOMAIN address"),
        (wire("0001 01 00 01 0050 01 7f0000"), "ends inside the IPV4 address"),
        (wire("0001 01 00 01 0050 03"), "ends inside the IPV6 address"),
    ],
)
def test_bad_metadata_is_a_protocol_error(data: bytes, message: str) -> None:
    with pytest.raises(MuxCoolProtocolError, match=re.escape(message)):
        FrameDecoder().feed(data)


def test_metadata_is_judged_before_its_data_arrives() -> None:
    """v2ray fails on the metadata; so does this, without waiting for the data."""
    with pytest.raises(MuxCoolProtocolError, match="unknown status"):
        FrameDecoder().feed(wire("0001 09 01"))


def test_payload_bound() -> None:
    decoder = FrameDecoder(max_payload=8192)
    assert decoder.feed(bytes.fromhex("0004 0001 02 01 2000")) == []  # 8192: waits for it
    with pytest.raises(MuxCoolProtocolError, match="payload of 8193 bytes"):
        FrameDecoder(max_payload=8192).feed(bytes.fromhex("0004 0001 02 01 2001"))


def test_an_announced_length_is_not_allocated_before_it_arrives() -> None:
    decoder = FrameDecoder()
    decoder.feed(bytes.fromhex("0004 0001 02 01 ffff") + b"a")
    assert decoder.pending == 9


def test_encoder_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="needs a target"):
        encode_frame(Frame(1, Status.NEW))
    with pytest.raises(ValueError, match="only a New frame"):
        encode_frame(
            Frame(1, Status.KEEP, target=Target(Network.TCP, 1, AddressType.IPV4, bytes(4)))
        )
    with pytest.raises(ValueError, match="needs option Data"):
        encode_frame(Frame(1, Status.KEEP, payload=b"x"))
    with pytest.raises(ValueError, match="metadata of 513"):
        encode_frame(Frame(1, Status.KEEP, extra=bytes(509)))
