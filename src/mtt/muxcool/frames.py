"""The Mux.Cool frame codec (v2ray's common/mux/frame.go; docs/protocol.md §11).

Every frame is a 2-byte big-endian metadata length L, L bytes of metadata,
then, only when the metadata's option has Data (0x01), a 2-byte big-endian
length N and N payload bytes:

    metadata  u16 session id, u8 status, u8 option
              New only: u8 network (1 TCP, 2 UDP), u16 port, u8 address type
              (1 IPv4: 4 bytes, 2 domain: u8 length + bytes, 3 IPv6: 16 bytes),
              the address; port before address, as v2ray's PortThenAddress()

What follows the fields a status defines, up to L, is kept as ``extra``:
Xray puts the XUDP GlobalID (8 bytes) or the client's source address there in
New frames, and a UDP address in Keep frames; v2ray ignores it, and so does a
server that sends every sub-connection to one dst.

Checks as v2ray's FrameMetadata.Unmarshal makes them, so a peer that v2ray
would drop is dropped here too: L at most 512, at least 4, at least 8 for New;
an unknown status, network or address type ends the session. Not checked,
because the target is never dialed: the characters of a domain (v2ray refuses
some, and crashes on an empty one).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from mtt.errors import MuxCoolProtocolError

__all__ = [
    "MAX_METADATA",
    "MAX_PAYLOAD",
    "OPTION_DATA",
    "OPTION_ERROR",
    "AddressType",
    "Frame",
    "FrameDecoder",
    "Network",
    "Status",
    "Target",
    "encode_data",
    "encode_end",
    "encode_frame",
]

MAX_METADATA = 512  # v2ray: "invalid metalen" beyond it
MAX_PAYLOAD = 0xFFFF  # the length field is a u16; v2ray reads any of them
OPTION_DATA = 0x01
OPTION_ERROR = 0x02

_U16 = struct.Struct(">H")
_META = struct.Struct(">HBB")  # id, status, option
_NEW = struct.Struct(">BHB")  # network, port, address type


class Status(enum.IntEnum):
    """What a frame does to its sub-connection (v2ray's SessionStatus)."""

    NEW = 0x01
    KEEP = 0x02
    END = 0x03
    KEEPALIVE = 0x04


class Network(enum.IntEnum):
    TCP = 0x01
    UDP = 0x02


class AddressType(enum.IntEnum):
    """Mux.Cool's own numbering (v2ray's protocol.AddressType), not SOCKS5's."""

    IPV4 = 0x01
    DOMAIN = 0x02
    IPV6 = 0x03


_STATUSES = {int(s): s for s in Status}
_NETWORKS = {int(n): n for n in Network}
_ADDRESS_SIZES = {AddressType.IPV4: 4, AddressType.IPV6: 16}


@dataclass(frozen=True, slots=True)
class Target:
    """Where a New frame asks the sub-connection to go (logged, never dialed)."""

    network: Network
    port: int
    address_type: AddressType
    address: bytes  # 4 or 16 bytes of IP, or the domain as sent

    def host(self) -> str:
        """The address as text, for a log line."""
        if self.address_type is AddressType.DOMAIN:
            return self.address.decode("latin-1")
        return str(ipaddress.ip_address(self.address))


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. ``payload`` is present (maybe empty) iff option has Data."""

    session_id: int
    status: Status
    option: int = 0
    target: Target | None = None  # New frames only
    extra: bytes = b""  # metadata beyond the fields of its status
    payload: bytes = b""

    @property
    def has_data(self) -> bool:
        return bool(self.option & OPTION_DATA)


def encode_frame(frame: Frame) -> bytes:
    """A frame as v2ray's FrameMetadata.WriteTo and writeMetaWithFrame write it."""
    meta = bytearray(_META.pack(frame.session_id, frame.status, frame.option))
    target = frame.target
    if (target is None) == (frame.status is Status.NEW):
        raise ValueError("a New frame needs a target, and only a New frame has one")
    if target is not None:
        meta += _NEW.pack(target.network, target.port, target.address_type)
        if target.address_type is AddressType.DOMAIN:
            meta.append(len(target.address))
        meta += target.address
    meta += frame.extra
    if len(meta) > MAX_METADATA:
        raise ValueError(f"Mux.Cool metadata of {len(meta)} bytes exceeds {MAX_METADATA}")
    out = _U16.pack(len(meta)) + meta
    if frame.has_data:
        if len(frame.payload) > MAX_PAYLOAD:
            raise ValueError(
                f"Mux.Cool payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}"
            )
        out += _U16.pack(len(frame.payload)) + frame.payload
    elif frame.payload:
        raise ValueError("a payload needs option Data")
    return bytes(out)


_KEEP_DATA = struct.Struct(">HHBBH")  # meta length 4, id, Keep, Data, payload length
_END = struct.Struct(">HHBB")


def encode_data(session_id: int, payload: bytes | bytearray | memoryview) -> bytes:
    """A Keep frame with data: what a server sends for every chunk (hot path)."""
    return _KEEP_DATA.pack(4, session_id, Status.KEEP, OPTION_DATA, len(payload)) + payload


def encode_end(session_id: int, error: bool = False) -> bytes:
    """An End frame; option Error tells the peer the sub-connection failed."""
    return _END.pack(4, session_id, Status.END, OPTION_ERROR if error else 0)


class FrameDecoder:
    """Incremental frame parser: bytes in any split in, whole frames out.

    Holds at most one incomplete frame between feeds (2 + max_metadata + 2 +
    max_payload bytes) and never allocates an announced length before the
    bytes have arrived.
    """

    __slots__ = ("_buf", "_max_metadata", "_max_payload")

    def __init__(self, max_metadata: int = MAX_METADATA, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max_metadata = max_metadata
        self._max_payload = max_payload

    @property
    def pending(self) -> int:
        """Bytes held for a frame that is not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Parse every complete frame; raise MuxCoolProtocolError on bad input."""
        view = memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        buf = self._buf
        if buf:
            buf += view
            frames, used = self._parse(buf)
            if used:
                del buf[:used]
        else:
            frames, used = self._parse(view)
            if used < len(view):
                buf += view[used:]
        return frames

    def _parse(self, src: bytearray | memoryview) -> tuple[list[Frame], int]:
        """Frames from the start of ``src`` and how many bytes they used."""
        frames: list[Frame] = []
        end = len(src)
        off = 0
        max_metadata = self._max_metadata
        max_payload = self._max_payload
        with memoryview(src) as view:
            while end - off >= 2:
                (meta_len,) = _U16.unpack_from(view, off)
                if meta_len > max_metadata:
                    raise MuxCoolProtocolError(
                        f"Mux.Cool: metadata of {meta_len} bytes (at most {max_metadata})"
                    )
                if meta_len < 4:
                    raise MuxCoolProtocolError(
                        f"Mux.Cool: metadata of {meta_len} bytes (at least 4)"
                    )
                meta_end = off + 2 + meta_len
                if meta_end > end:
                    break
                # Checked before the data length is even there: v2ray fails on the metadata.
                meta = _metadata(view[off + 2 : meta_end])
                option = meta[2]
                stop = meta_end
                payload = b""
                if option & OPTION_DATA:
                    if end - meta_end < 2:
                        break
                    (length,) = _U16.unpack_from(view, meta_end)
                    if length > max_payload:
                        raise MuxCoolProtocolError(
                            f"Mux.Cool: payload of {length} bytes (at most {max_payload})"
                        )
                    stop = meta_end + 2 + length
                    if stop > end:
                        break
                    payload = bytes(view[meta_end + 2 : stop])
                sid, status, _, target, extra = meta
                frames.append(Frame(sid, status, option, target, extra, payload))
                off = stop
        return frames, off


def _metadata(meta: memoryview) -> tuple[int, Status, int, Target | None, bytes]:
    """(id, status, option, target, extra) of one frame's metadata (4..512 bytes)."""
    sid, raw_status, option = _META.unpack_from(meta)
    status = _STATUSES.get(raw_status)
    if status is None:
        raise MuxCoolProtocolError(f"Mux.Cool: unknown status {raw_status:#04x}")
    if status is not Status.NEW:
        return sid, status, option, None, bytes(meta[4:])
    if len(meta) < 8:
        raise MuxCoolProtocolError(f"Mux.Cool: New metadata of {len(meta)} bytes (at least 8)")
    raw_network, port, raw_type = _NEW.unpack_from(meta, 4)
    network = _NETWORKS.get(raw_network)
    if network is None:
        raise MuxCoolProtocolError(f"Mux.Cool: unknown network {raw_network:#04x}")
    try:
        address_type = AddressType(raw_type)
    except ValueError:
        raise MuxCoolProtocolError(f"Mux.Cool: unknown address type {raw_type:#04x}") from None
    start = 8
    if address_type is AddressType.DOMAIN:
        if len(meta) < 9:
            raise MuxCoolProtocolError("Mux.Cool: New metadata ends before the domain's length")
        size = meta[8]
        start = 9
    else:
        size = _ADDRESS_SIZES[address_type]
    stop = start + size
    if stop > len(meta):
        raise MuxCoolProtocolError(
            f"Mux.Cool: New metadata ends inside the {address_type.name} address"
        )
    target = Target(network, port, address_type, bytes(meta[start:stop]))
    return sid, status, option, target, bytes(meta[stop:])
