"""The smux frame codec against the layout of xtaci/smux frame.go and recvLoop."""

from __future__ import annotations

import struct

import pytest

from mtt.errors import SmuxProtocolError
from mtt.smux import (
    HEADER_SIZE,
    Cmd,
    Frame,
    FrameDecoder,
    decode_upd,
    encode_frame,
    encode_upd,
)


def decode_all(data: bytes) -> list[Frame]:
    return FrameDecoder().feed(data)


def sample_stream(version: int = 2) -> tuple[bytes, list[Frame]]:
    frames = [
        Frame(version, Cmd.SYN, 3, b""),
        Frame(version, Cmd.PSH, 3, b"hello"),
        Frame(version, Cmd.NOP, 0, b""),
        Frame(version, Cmd.PSH, 5, bytes(range(256)) * 3),
        Frame(version, Cmd.PSH, 3, b""),
        Frame(version, Cmd.FIN, 3, b""),
    ]
    if version == 2:
        frames.append(Frame(2, Cmd.UPD, 5, struct.pack("<II", 768, 65536)))
    wire = b"".join(encode_frame(f.version, f.cmd, f.stream_id, f.payload) for f in frames)
    return wire, frames


def test_header_layout_is_little_endian_bbhi() -> None:
    assert HEADER_SIZE == 8
    wire = encode_frame(1, Cmd.PSH, 0x01020304, b"xyz")
    assert wire == bytes([1, 2, 3, 0, 4, 3, 2, 1]) + b"xyz"
    assert encode_frame(2, Cmd.NOP, 0) == bytes([2, 3, 0, 0, 0, 0, 0, 0])


def test_encode_accepts_bytearray_and_memoryview() -> None:
    expected = encode_frame(1, Cmd.PSH, 7, b"abc")
    assert encode_frame(1, Cmd.PSH, 7, bytearray(b"abc")) == expected
    assert encode_frame(1, Cmd.PSH, 7, memoryview(b"xabcx")[1:4]) == expected


def test_encode_rejects_payload_over_u16() -> None:
    encode_frame(1, Cmd.PSH, 3, bytes(0xFFFF))
    with pytest.raises(ValueError):
        encode_frame(1, Cmd.PSH, 3, bytes(0x10000))


def test_upd_layout_and_uint32_wrap() -> None:
    wire = encode_upd(2, 9, 2**32 + 5, 65536)
    assert wire[:8] == struct.pack("<BBHI", 2, 4, 8, 9)
    assert wire[8:] == struct.pack("<II", 5, 65536)
    assert decode_upd(wire[8:]) == (5, 65536)
    assert encode_upd(2, 9, -1, 0)[8:12] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize("version", [1, 2])
def test_round_trip(version: int) -> None:
    wire, frames = sample_stream(version)
    assert decode_all(wire) == frames


def test_split_at_every_offset() -> None:
    wire, frames = sample_stream(2)
    for cut in range(len(wire) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
        assert got == frames, cut
        assert decoder.pending == 0


def test_split_at_every_pair_of_offsets_small() -> None:
    wire = encode_frame(2, Cmd.PSH, 3, b"abcdef") + encode_upd(2, 3, 1, 2)
    expected = decode_all(wire)
    for a in range(len(wire) + 1):
        for b in range(a, len(wire) + 1):
            decoder = FrameDecoder()
            got = decoder.feed(wire[:a]) + decoder.feed(wire[a:b]) + decoder.feed(wire[b:])
            assert got == expected


def test_byte_by_byte_and_types() -> None:
    wire, frames = sample_stream(2)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(wire)):
        chunk = wire[i : i + 1]
        kind = i % 3
        got += decoder.feed(
            chunk if kind == 0 else bytearray(chunk) if kind == 1 else memoryview(chunk)
        )
    assert got == frames
    assert all(type(f.payload) is bytes for f in got)


def test_many_frames_in_one_feed() -> None:
    one = encode_frame(1, Cmd.PSH, 3, b"x" * 100)
    frames = decode_all(one * 1000)
    assert len(frames) == 1000
    assert all(f == Frame(1, Cmd.PSH, 3, b"x" * 100) for f in frames)


def test_big_psh_in_tiny_pieces_is_accumulated_not_preallocated() -> None:
    payload = bytes(range(256)) * 256  # 65536 - too big: use the u16 maximum
    payload = payload[:0xFFFF]
    wire = encode_frame(1, Cmd.PSH, 3, payload)
    decoder = FrameDecoder()
    decoder.feed(wire[:8])
    # Only the header is held: nothing is reserved for the announced 65535 bytes.
    assert decoder.pending == 8
    got: list[Frame] = []
    for i in range(8, len(wire), 7):
        got += decoder.feed(wire[i : i + 7])
        if not got:
            assert decoder.pending == min(i + 7, len(wire))
    assert got == [Frame(1, Cmd.PSH, 3, payload)]
    assert decoder.pending == 0


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("size", [0, 1, 16384, 0xFFFF])
def test_a_message_of_exactly_one_psh_is_one_raw_frame(version: int, size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    message = bytearray(encode_frame(version, Cmd.PSH, 7, payload))
    decoder = FrameDecoder()
    got = decoder.feed_raw(memoryview(message))
    assert got == [(version, int(Cmd.PSH), 7, payload)]
    assert type(got[0][3]) is bytes
    assert decoder.pending == 0
    # The payload is a copy: the WebSocket layer reuses the message's buffer.
    message[HEADER_SIZE:] = b"\0" * size
    assert got[0][3] == payload


def test_one_psh_message_split_at_every_byte_gives_the_same_frame() -> None:
    wire = encode_frame(1, Cmd.PSH, 3, bytes(range(200)))
    whole = FrameDecoder().feed_raw(wire)
    for cut in range(len(wire) + 1):
        decoder = FrameDecoder()
        assert decoder.feed_raw(wire[:cut]) + decoder.feed_raw(wire[cut:]) == whole, cut
        assert decoder.pending == 0


def test_a_whole_psh_after_a_pending_tail_is_not_read_from_its_own_start() -> None:
    first = encode_frame(1, Cmd.PSH, 3, b"abc")
    second = encode_frame(1, Cmd.PSH, 5, b"defgh")
    decoder = FrameDecoder()
    assert decoder.feed(first[:5]) == []
    # second alone would be one whole frame, but it follows first's held bytes.
    assert decoder.feed(first[5:] + second) == [
        Frame(1, Cmd.PSH, 3, b"abc"),
        Frame(1, Cmd.PSH, 5, b"defgh"),
    ]
    assert decoder.feed(second[:9]) == []
    assert decoder.feed(second[9:]) == [Frame(1, Cmd.PSH, 5, b"defgh")]


def test_a_psh_split_three_ways_survives_the_caller_reusing_its_buffer() -> None:
    # The WebSocket layer hands each frame's payload in one reused buffer: the
    # pieces of a PSH kept between feeds must be copies.
    payload = bytes(i % 253 for i in range(16384))
    wire = encode_frame(1, Cmd.PSH, 3, payload) + encode_frame(1, Cmd.FIN, 3)
    for a, b in [(1, 2), (8, 9), (8, 16384), (100, 16391), (16391, 16392), (16392, 16399)]:
        decoder = FrameDecoder()
        scratch = bytearray(len(wire))
        got = []
        for lo, hi in ((0, a), (a, b), (b, len(wire))):
            scratch[: hi - lo] = wire[lo:hi]
            got += decoder.feed_raw(memoryview(scratch)[: hi - lo])
            scratch[:] = b"\xee" * len(scratch)
        assert got == [(1, int(Cmd.PSH), 3, payload), (1, int(Cmd.FIN), 3, b"")], (a, b)
        assert all(type(f[3]) is bytes for f in got)
        assert decoder.pending == 0


@pytest.mark.parametrize("extra", [b"", b"\x01"])
def test_an_exact_length_psh_with_a_bad_version_is_still_rejected(extra: bytes) -> None:
    wire = struct.pack("<BBHI", 3, int(Cmd.PSH), 2 + len(extra), 3) + b"ab" + extra
    with pytest.raises(SmuxProtocolError, match="unsupported version 3"):
        FrameDecoder().feed_raw(wire)


def test_leftover_is_kept_when_nothing_was_pending() -> None:
    wire = encode_frame(1, Cmd.PSH, 3, b"abc") + encode_frame(1, Cmd.PSH, 5, b"defg")
    decoder = FrameDecoder()
    assert decoder.feed(wire[:13]) == [Frame(1, Cmd.PSH, 3, b"abc")]
    assert decoder.pending == 2
    assert decoder.feed(wire[13:]) == [Frame(1, Cmd.PSH, 5, b"defg")]


@pytest.mark.parametrize("version", [0, 3, 255])
def test_bad_version(version: int) -> None:
    with pytest.raises(SmuxProtocolError):
        decode_all(struct.pack("<BBHI", version, 3, 0, 0))


@pytest.mark.parametrize("cmd", [5, 6, 255])
def test_bad_cmd(cmd: int) -> None:
    with pytest.raises(SmuxProtocolError):
        decode_all(struct.pack("<BBHI", 2, cmd, 0, 0))


def test_error_is_raised_as_soon_as_the_header_is_complete() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x09\x02\x10\x00\x03\x00\x00") == []
    with pytest.raises(SmuxProtocolError):
        decoder.feed(b"\x00")


def test_upd_in_version_1_is_rejected() -> None:
    with pytest.raises(SmuxProtocolError):
        decode_all(encode_upd(1, 3, 0, 0))


def test_upd_reads_eight_bytes_whatever_the_length_field() -> None:
    # Go's recvLoop reads szCmdUPD bytes and never looks at the length.
    wire = struct.pack("<BBHI", 2, 4, 0, 3) + struct.pack("<II", 1, 2)
    wire += encode_frame(2, Cmd.NOP, 0)
    assert decode_all(wire) == [
        Frame(2, Cmd.UPD, 3, struct.pack("<II", 1, 2)),
        Frame(2, Cmd.NOP, 0, b""),
    ]
    wire = struct.pack("<BBHI", 2, 4, 500, 3) + struct.pack("<II", 1, 2)
    assert decode_all(wire) == [Frame(2, Cmd.UPD, 3, struct.pack("<II", 1, 2))]


@pytest.mark.parametrize("cmd", [Cmd.SYN, Cmd.FIN, Cmd.NOP])
def test_syn_fin_nop_ignore_the_length_field(cmd: Cmd) -> None:
    # Go reads no payload for these: the following bytes are the next header.
    wire = struct.pack("<BBHI", 1, cmd, 4, 3) + encode_frame(1, Cmd.PSH, 3, b"abcd")
    assert decode_all(wire) == [Frame(1, cmd, 3, b""), Frame(1, Cmd.PSH, 3, b"abcd")]


def test_psh_with_zero_length_is_a_frame_without_payload() -> None:
    assert decode_all(encode_frame(1, Cmd.PSH, 3)) == [Frame(1, Cmd.PSH, 3, b"")]


def test_non_byte_memoryview_is_read_as_bytes() -> None:
    wire = encode_frame(1, Cmd.PSH, 3, b"abcd")
    view = memoryview(wire).cast("H")
    assert decode_all(view.tobytes()) == FrameDecoder().feed(view)
