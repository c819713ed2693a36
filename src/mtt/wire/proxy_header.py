"""The PROXY protocol header (haproxy's proxy-protocol.txt, versions 1 and 2),
sans I/O: feed bytes, get the client's address, or NEED_DATA, or ProtocolError.

A load balancer in front (nginx stream `proxy_protocol on;`, haproxy
`send-proxy` / `send-proxy-v2`) opens each connection with one header that
names the client it accepted. The header is read before anything else,
before the TLS handshake too, so it is parsed from raw bytes here and the I/O
layer hands whatever follows it to TLS or HTTP.

Theory of operation: the first byte decides the version ("P" for v1, CR for
the v2 signature); any other start is refused at once, so a client speaking
TLS or HTTP directly is closed without waiting for a deadline. Every size is
capped: a v1 line at 107 bytes (§2.1), a v2 header at the caller's
max_v2_header bytes with its TLVs skipped unread (§2.2).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from mtt.errors import ProtocolError

V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107  # §2.1: the worst case "PROXY UNKNOWN" + two IPv6 + ports + CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length (§2.2)

_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_TP_UNSPEC, _TP_STREAM, _TP_DGRAM = 0, 1, 2
_INET_BLOCK = struct.Struct("!4s4sHH")
_INET6_BLOCK = struct.Struct("!16s16sHH")


class NeedData(enum.Enum):
    NEED_DATA = "need data"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header. source is None when the sender names no client
    (v1 UNKNOWN, v2 LOCAL or a non-IP family): use the connection's own peer."""

    version: int
    source: tuple[str, int] | None
    length: int  # bytes the header took; what follows belongs to TLS/HTTP


def parse_header(data: bytes, *, max_v2_header: int) -> ProxyHeader | NeedData:
    """Parse the header at the start of data (which may hold more after it);
    a v2 header longer than max_v2_header bytes is refused."""
    if not data:
        return NEED_DATA
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data, max_v2_header)
    raise ProtocolError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | NeedData:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProtocolError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX_LINE)
    if end < 0:
        if len(data) >= V1_MAX_LINE:
            raise ProtocolError(f"v1 line longer than {V1_MAX_LINE} bytes")
        return NEED_DATA
    parts = data[:end].split(b" ")
    length = end + 2
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(1, None, length)  # §2.1: the rest of the line is ignored
    if len(parts) != 6:
        raise ProtocolError("v1 header does not have 6 fields")
    proto, src, _dst, sport, dport = parts[1:]
    if proto == b"TCP4":
        family: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv4Address
    elif proto == b"TCP6":
        family = ipaddress.IPv6Address
    else:
        raise ProtocolError(f"v1 protocol {_show(proto)} is not TCP4, TCP6 or UNKNOWN")
    source = _v1_address(src, family)
    _v1_address(_dst, family)
    port = _v1_port(sport)
    _v1_port(dport)
    return ProxyHeader(1, (source, port), length)


def _v1_address(field: bytes, family: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str:
    # A scope id ("fe80::1%eth0") names an interface of the proxy, not the client.
    if not field or not field.isascii() or b"%" in field:
        raise ProtocolError(f"v1 address {_show(field)} is not valid")
    try:
        return str(family(field.decode("ascii")))
    except ValueError:
        raise ProtocolError(f"v1 address {_show(field)} is not valid") from None


def _v1_port(field: bytes) -> int:
    if not (field.isdigit() and field.isascii() and 1 <= len(field) <= 5):
        raise ProtocolError(f"v1 port {_show(field)} is not valid")
    port = int(field)
    if port > 65535 or (field[0:1] == b"0" and len(field) > 1):
        raise ProtocolError(f"v1 port {_show(field)} is not valid")
    return port


def _parse_v2(data: bytes, max_header: int) -> ProxyHeader | NeedData:
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise ProtocolError("not a PROXY protocol header")
    if len(data) < V2_FIXED:
        return NEED_DATA
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    (size,) = struct.unpack_from("!H", data, 14)
    if version != 2:
        raise ProtocolError(f"v2 header with version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProtocolError(f"v2 command {command} is not LOCAL or PROXY")
    if family > _AF_UNIX or transport > _TP_DGRAM:
        raise ProtocolError(f"v2 address family/transport 0x{data[13]:02x} unknown")
    if V2_FIXED + size > max_header:
        raise ProtocolError(f"v2 header of {V2_FIXED + size} bytes, more than {max_header}")
    length = V2_FIXED + size
    if len(data) < length:
        return NEED_DATA
    if command == _V2_LOCAL:  # a health check by the proxy itself: no client (§2.2)
        return ProxyHeader(2, None, length)
    if transport == _TP_DGRAM:
        raise ProtocolError("v2 header for a datagram connection")
    if transport == _TP_UNSPEC:  # an unsupported protocol: the real peer is used (§2.2)
        return ProxyHeader(2, None, length)
    if family == _AF_INET:
        block: struct.Struct = _INET_BLOCK
        address: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv4Address
    elif family == _AF_INET6:
        block, address = _INET6_BLOCK, ipaddress.IPv6Address
    else:  # UNSPEC or UNIX: no IP to report, the receiver uses the real peer (§2.2)
        return ProxyHeader(2, None, length)
    if size < block.size:
        raise ProtocolError(f"v2 address block of {size} bytes is too short")
    src, _dst, sport, _dport = block.unpack_from(data, V2_FIXED)
    return ProxyHeader(2, (str(address(src)), sport), length)


def _show(field: bytes) -> str:
    """A peer's bytes, safe and short enough for a log line."""
    return repr(field[:48])[1:]


class ProxyHeaderReader:
    """Accumulates a connection's first bytes until its header is complete."""

    def __init__(self, *, max_v2_header: int) -> None:
        self.max_v2_header = max_v2_header
        self._buffer = b""
        self.remainder = b""  # bytes after the header, once it is complete

    def feed(self, data: bytes) -> ProxyHeader | NeedData:
        self._buffer += data
        result = parse_header(self._buffer, max_v2_header=self.max_v2_header)
        if isinstance(result, ProxyHeader):
            self.remainder = self._buffer[result.length :]
            self._buffer = b""
        return result
