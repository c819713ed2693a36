"""The server name (SNI) and the ALPN protocols a TLS ClientHello offers, read
from its bytes before any TLS library sees them (sans-I/O).

The tunnel port answers ACME's TLS-ALPN-01 challenge (RFC 8737) itself: a
ClientHello that offers ALPN "acme-tls/1" for a name with a pending
challenge gets the challenge certificate, every other one the real
certificate. OpenSSL runs the servername callback before it looks at ALPN,
so the choice cannot be made inside the handshake; first_bytes.py already
holds the whole ClientHello before the handshake starts, and picks the
context from what this module reads in it.

The input is hostile: every length is checked against what is left, and
anything that is not a well-formed ClientHello (RFC 8446 §4.1.2; the
server_name extension of RFC 6066 §3, ALPN of RFC 7301 §3.1) gives None.
A ClientHello may span several handshake records (RFC 8446 §5.1): their
payloads are joined first.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtt.errors import ProtocolError

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HOST_NAME = 0


@dataclass(frozen=True, slots=True)
class HelloNames:
    """What the ClientHello asks for: the SNI host name (lowercase ASCII, or None
    when absent) and the ALPN protocol names in the client's order."""

    server_name: str | None
    alpn: tuple[bytes, ...]


class _Reader:
    """Length-checked reads over one buffer."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)
        self._at = 0

    def left(self) -> int:
        return len(self._data) - self._at

    def take(self, size: int) -> memoryview:
        if size > self.left():
            raise ProtocolError("malformed ClientHello")
        out = self._data[self._at : self._at + size]
        self._at += size
        return out

    def take_all(self) -> memoryview:
        return self.take(self.left())

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> _Reader:
        return _Reader(self.take(self.number(length_size)))


def handshake_payload(data: bytes | bytearray, limit: int) -> bytes | None:
    """The handshake bytes of the leading handshake records of `data` (at most
    `limit` bytes of input); None if the first record is not a handshake record."""
    view = memoryview(bytes(data[:limit]))
    out = bytearray()
    at = 0
    while len(view) - at >= 5 and view[at] == _HANDSHAKE:
        length = int.from_bytes(view[at + 3 : at + 5], "big")
        out += view[at + 5 : at + 5 + length]
        at += 5 + length
    return bytes(out) if at else None


def hello_names(data: bytes | bytearray, limit: int) -> HelloNames | None:
    """SNI and ALPN of the ClientHello that `data` starts with; None if there is
    no complete, well-formed one in its first `limit` bytes."""
    payload = handshake_payload(data, limit)
    if payload is None:
        return None
    try:
        return _parse(_Reader(payload))
    except ProtocolError:
        return None


def _parse(message: _Reader) -> HelloNames:
    if message.number(1) != _CLIENT_HELLO:
        raise ProtocolError("malformed ClientHello")
    body = _Reader(message.take(message.number(3)))
    body.take(2 + 32)  # legacy_version, random
    body.vector(1)  # legacy_session_id
    body.vector(2)  # cipher_suites
    body.vector(1)  # legacy_compression_methods
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    if body.left() == 0:  # no extensions at all (TLS 1.0-era clients)
        return HelloNames(None, ())
    extensions = body.vector(2)
    if body.left():
        raise ProtocolError("malformed ClientHello")
    seen: set[int] = set()
    while extensions.left():
        kind = extensions.number(2)
        content = extensions.vector(2)
        if kind in seen:  # RFC 8446 §4.2: at most one of each; OpenSSL refuses the hello
            raise ProtocolError("malformed ClientHello")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            server_name = _server_name(content)
        elif kind == _EXT_ALPN:
            alpn = _alpn(content)
    return HelloNames(server_name, alpn)


def _server_name(content: _Reader) -> str | None:
    names = content.vector(2)
    if content.left():
        raise ProtocolError("malformed ClientHello")
    host: str | None = None
    while names.left():
        kind = names.number(1)
        name = bytes(names.vector(2).take_all())
        if kind == _HOST_NAME and host is None:
            if not name or not name.isascii() or b"\x00" in name:
                raise ProtocolError("malformed ClientHello")
            host = name.decode("ascii").lower().rstrip(".")
    return host


def _alpn(content: _Reader) -> tuple[bytes, ...]:
    names = content.vector(2)
    if content.left():
        raise ProtocolError("malformed ClientHello")
    out = []
    while names.left():
        name = bytes(names.vector(1).take_all())
        if not name:  # RFC 7301 §3.1: empty names are not allowed
            raise ProtocolError("malformed ClientHello")
        out.append(name)
    return tuple(out)
