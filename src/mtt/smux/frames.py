"""The xtaci/smux frame codec (frame.go, Session.recvLoop in session.go).

Every frame starts with an 8-byte little-endian header ``<BBHI``: version,
cmd, length, stream id. What follows the header is decided by the cmd, not by
the length field, because that is how Go's recvLoop reads the stream:

- PSH: ``length`` payload bytes (length 0 carries nothing).
- UPD: always 8 payload bytes (u32 consumed, u32 window), whatever ``length``
  says; Go reads ``szCmdUPD`` bytes unconditionally.
- SYN, FIN, NOP: no payload, whatever ``length`` says; Go reads nothing after
  the header, so a non-zero length there makes the next bytes the next header.

Reading "by cmd" keeps us in step with a Go peer on the same byte stream even
if a length field is odd, which is what interoperability needs.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from mtt.errors import SmuxProtocolError

__all__ = [
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "UPD_SIZE",
    "Cmd",
    "Frame",
    "FrameDecoder",
    "RawFrame",
    "decode_upd",
    "encode_frame",
    "encode_upd",
]

HEADER_SIZE = 8
UPD_SIZE = 8
MAX_PAYLOAD = 0xFFFF  # the length field is a u16
_U32 = 0xFFFFFFFF

_HEADER = struct.Struct("<BBHI")
_UPD = struct.Struct("<II")


class Cmd(enum.IntEnum):
    """Frame commands; UPD exists only in protocol version 2."""

    SYN = 0
    FIN = 1
    PSH = 2
    NOP = 3
    UPD = 4


# Indexing a tuple is much cheaper than Cmd(n) on the hot path.
_CMDS: tuple[Cmd, ...] = tuple(Cmd)
_PSH = int(Cmd.PSH)
_UPD_CMD = int(Cmd.UPD)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; ``payload`` is empty for SYN, FIN and NOP."""

    version: int
    cmd: Cmd
    stream_id: int
    payload: bytes


def encode_frame(
    version: int,
    cmd: Cmd,
    stream_id: int,
    payload: bytes | bytearray | memoryview = b"",
) -> bytes:
    """Header plus payload, as Go's sendLoop writes it (length = len(payload))."""
    view = memoryview(payload).cast("B")
    if len(view) > MAX_PAYLOAD:
        raise ValueError(f"smux payload of {len(view)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(version, cmd, len(view), stream_id) + view


def encode_upd(version: int, stream_id: int, consumed: int, window: int) -> bytes:
    """A UPD frame; counters wrap at 2**32 like Go's uint32 arithmetic."""
    return _HEADER.pack(version, _UPD_CMD, UPD_SIZE, stream_id) + _UPD.pack(
        consumed & _U32, window & _U32
    )


def decode_upd(payload: bytes) -> tuple[int, int]:
    """(consumed, window) from a UPD payload of exactly UPD_SIZE bytes."""
    consumed, window = _UPD.unpack(payload)
    return consumed, window


RawFrame = tuple[int, int, int, bytes]
"""(version, cmd, stream id, payload): a Frame without the object, for the session's hot path."""


class FrameDecoder:
    """Incremental frame parser: bytes in any split in, whole frames out.

    Holds at most one incomplete frame between feeds (< 8 + 65535 bytes) and
    never allocates an announced length before the bytes have arrived. A PSH
    payload split across feeds (gorilla sends each 16 KiB smux frame as two
    WebSocket frames) is kept as the pieces that came and joined once, not
    copied into a buffer and out again; only a split header or UPD (< 16
    bytes) goes into the buffer.
    """

    __slots__ = ("_buf", "_got", "_left", "_pieces", "_sid", "_version")

    def __init__(self) -> None:
        self._buf = bytearray()  # an incomplete header or UPD, and what followed it
        self._left = 0  # payload bytes still to come of the PSH in progress
        self._got = 0  # ... the bytes of it that came, in _pieces
        self._pieces: list[bytes | memoryview] = []
        self._version = 0  # ... and its header's version and stream id
        self._sid = 0

    @property
    def pending(self) -> int:
        """Bytes held for a frame that is not complete yet."""
        if self._left:
            return HEADER_SIZE + self._got
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Parse every complete frame; raise SmuxProtocolError on bad input."""
        return [Frame(v, _CMDS[c], sid, p) for v, c, sid, p in self.feed_raw(data)]

    def feed_raw(self, data: bytes | bytearray | memoryview) -> list[RawFrame]:
        """feed() as tuples with the cmd as an int: a frame object per 16 KiB of
        data was a measurable share of a busy session's CPU."""
        view = data if type(data) is memoryview else memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        frames: list[RawFrame] = []
        left = self._left
        if left:
            end = len(view)
            if end < left:
                if end:
                    self._pieces.append(bytes(view))  # a copy: the caller may reuse its buffer
                    self._left = left - end
                    self._got += end
                return frames
            pieces = self._pieces
            pieces.append(view[:left])
            frames.append((self._version, _PSH, self._sid, b"".join(pieces)))
            pieces.clear()
            self._left = self._got = 0
            if end == left:
                return frames
            view = view[left:]
        buf = self._buf
        if buf:
            buf += view
            with memoryview(buf) as whole:
                used = self._parse(whole, frames)
            if used:
                # One compaction per feed; CPython trims a bytearray's front cheaply.
                del buf[:used]
            return frames
        end = len(view)
        if not frames and end >= HEADER_SIZE:
            version, cmd, length, stream_id = _HEADER.unpack_from(view)
            if cmd == _PSH and version in {1, 2}:
                # Common cases: the message is exactly one PSH frame (Go's smux writes
                # one frame per Write, which becomes one WebSocket message), or the
                # start of one that gorilla split.
                stop = HEADER_SIZE + length
                if end == stop:
                    return [
                        (version, _PSH, stream_id, bytes(view[HEADER_SIZE:]) if length else b"")
                    ]
                if end < stop:
                    self._begin_psh(version, stream_id, view[HEADER_SIZE:], stop - end)
                    return frames
        # Nothing pending: parse the caller's bytes in place and keep only the tail
        # of an incomplete frame.
        used = self._parse(view, frames)
        if used < end:
            buf += view[used:]
        return frames

    def _begin_psh(self, version: int, stream_id: int, got: memoryview, left: int) -> None:
        """A PSH whose payload goes on in later feeds: what came of it is kept
        as it is (a copy: the caller may reuse its buffer), `left` bytes to come."""
        self._left = left
        self._got = len(got)
        self._version = version
        self._sid = stream_id
        if got:
            self._pieces.append(bytes(got))

    def _parse(self, view: memoryview, frames: list[RawFrame]) -> int:
        """Frames from the start of ``view`` onto ``frames``; how many bytes of it
        they (and a PSH started at its end) used."""
        append = frames.append
        end = len(view)
        off = 0
        unpack = _HEADER.unpack_from
        while end - off >= HEADER_SIZE:
            version, cmd, length, stream_id = unpack(view, off)
            # Same order of checks as Go's recvLoop: version, then cmd.
            if version not in {1, 2}:
                raise SmuxProtocolError(f"smux: unsupported version {version}")
            start = off + HEADER_SIZE
            if cmd == _PSH:
                stop = start + length
                if stop > end:
                    self._begin_psh(version, stream_id, view[start:end], stop - end)
                    return end
                append((version, cmd, stream_id, bytes(view[start:stop]) if length else b""))
            elif cmd == _UPD_CMD:
                if version != 2:
                    raise SmuxProtocolError("smux: UPD frame in protocol version 1")
                stop = start + UPD_SIZE
                if stop > end:
                    break
                append((version, cmd, stream_id, bytes(view[start:stop])))
            elif cmd < _PSH or cmd == 3:
                # SYN, FIN, NOP: Go ignores the length field and reads no payload.
                stop = start
                append((version, cmd, stream_id, b""))
            else:
                raise SmuxProtocolError(f"smux: unknown cmd {cmd}")
            off = stop
        return off
