"""What the server does with one parsed request head (sans-I/O).

To anyone without a valid user path the server must be indistinguishable from
a plain web server (docs/security.md): a GET of a user's path, a GET of an
unknown path, an upgrade on an unknown path and any other method all get the
same 404 page, or go to the fallback site when one is set. Only a WebSocket
upgrade (RFC 6455 §4.2.1) on a user's path becomes a tunnel. verdict() is
that decision; the caller parses the head (h11), acts on the verdict and does
the I/O. A head that does not parse is the caller's 400.

An upgrade may carry early data in Sec-WebSocket-Protocol (early_data.py,
docs/protocol.md §10), and an operator may limit which browser origins are
let in (origin.py).
"""

from __future__ import annotations

import binascii
import re
import urllib.parse
from base64 import b64decode
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mtt.address import quote
from mtt.core.users import MuxProtocol
from mtt.wire.early_data import EarlyData, TooLarge, early_data
from mtt.wire.origin import OriginPolicy

SMUX_ON = "smux_on"
SMUX_OFF = "smux_off"
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request head: header names lower-cased, in the order sent."""

    method: bytes
    target: bytes
    http_version: bytes  # b"1.1", b"1.0"
    headers: Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A valid upgrade on a user's path: hand the connection to the WebSocket
    layer with `head` (the request in the one spelling its parser accepts)."""

    key: str
    # What the client's sub-protocol asks for; None when it names none, and the
    # user's "mux" or the server's -mux-protocol decide when the route is taken.
    mode: MuxProtocol | None
    subprotocol: str | None  # to echo in the 101, None for none
    head: bytes
    early_data: bytes = b""  # to write to dst before any frame (docs/protocol.md §10)


@dataclass(frozen=True, slots=True)
class NotFound:
    """nginx's 404; `failure` names the handshake failure for the counters."""

    reason: str
    failure: str  # "unknown_path" | "not_websocket"
    head_only: bool
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class ToFallback:
    """What would be a 404 goes, from its first byte, to the fallback site."""

    reason: str
    failure: str


@dataclass(frozen=True, slots=True)
class BadRequest:
    """nginx's 400, then close."""

    reason: str


@dataclass(frozen=True, slots=True)
class Forbidden:
    """403: an upgrade from a browser origin -allow-origin does not list."""

    reason: str


@dataclass(frozen=True, slots=True)
class PlainHttpOnTlsPort:
    """Plain HTTP sent to the TLS listener: nginx's "plain HTTP request was
    sent to HTTPS port" 400, whatever the path."""

    head_only: bool


Verdict = Upgrade | NotFound | ToFallback | BadRequest | Forbidden | PlainHttpOnTlsPort


def verdict(
    head: RequestHead,
    *,
    route_exists: Callable[[str], bool],
    max_head: int,
    max_early_data: int,
    keep_alive_allowed: bool = True,
    fallback: bool = False,
    on_tls_port: bool = False,
    origins: OriginPolicy | None = None,
) -> Verdict:
    """The answer to one request head.

    route_exists tells whether a routing key names a user; max_head caps the
    head's size and max_early_data the bytes of early data; keep_alive_allowed
    is False once a connection has had its share of requests; fallback when
    404s go to a fallback site; on_tls_port for plain HTTP that came to the TLS
    listener; origins the browser origins allowed (None: any).
    """
    if head_size(head) > max_head:
        # h11 caps only a head still incomplete; one that arrived whole is
        # checked here, before routing, so its size tells nothing about paths.
        return BadRequest(f"request head larger than {max_head // 1024} KiB")
    if on_tls_port:
        return PlainHttpOnTlsPort(head_only=head.method == b"HEAD")
    key = routing_key(head.target)
    if key is None or not route_exists(key):
        reason = f"no user for path {quote(head.target.decode('latin-1'), 200)}"
        failure = "unknown_path"
    elif (problem := upgrade_problem(head)) is not None:
        reason = f"{key}: not a WebSocket upgrade ({problem})"
        failure = "not_websocket"
    else:
        return _upgrade(head, key, max_early_data, origins)
    if fallback:
        return ToFallback(reason, failure)
    keep_alive = (
        keep_alive_allowed
        and head.http_version == b"1.1"
        and not any(
            name == b"connection" and b"close" in value.lower() for name, value in head.headers
        )
    )
    return NotFound(reason, failure, head_only=head.method == b"HEAD", keep_alive=keep_alive)


def _upgrade(
    head: RequestHead,
    key: str,
    max_early_data: int,
    origins: OriginPolicy | None,
) -> Upgrade | BadRequest | Forbidden:
    """A valid upgrade on a user's path: its origin, sub-protocol, early data."""
    if origins:  # gorilla/websocket checks the origin once the upgrade is valid, too
        refused = origins.refused([value for name, value in head.headers if name == b"origin"])
        if refused is not None:
            return Forbidden(f"{key}: origin {quote(refused, 200)} not allowed")
    protocols = [value for name, value in head.headers if name == b"sec-websocket-protocol"]
    offered = b", ".join(protocols).decode("latin-1") if protocols else None
    mode, subprotocol = choose_subprotocol(offered)
    if subprotocol is None:
        found = early_data(offered, max_early_data)
        if isinstance(found, TooLarge):
            return BadRequest(
                f"{key}: early data of {found.size} bytes over the {found.limit}-byte bound"
            )
        if isinstance(found, EarlyData):
            # A client that sends early data carries one byte stream (§10), whatever the
            # user's "mux" or -mux-protocol says.
            head_without = canonical_upgrade(head, with_protocols=False)
            return Upgrade(key, MuxProtocol.NONE, found.header, head_without, found.data)
    return Upgrade(key, mode, subprotocol, canonical_upgrade(head))


def routing_key(target: bytes) -> str | None:
    """The user-table key of a request target: path only, percent-decoded.

    None when the target cannot name a user (bad escape, not UTF-8).
    """
    if target.startswith((b"http://", b"https://")):  # absolute form
        target = urllib.parse.urlsplit(target).path or b"/"
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if _BAD_ESCAPE.search(path):
        return None
    try:
        return urllib.parse.unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return None


def choose_subprotocol(header: str | None) -> tuple[MuxProtocol | None, str | None]:
    """(mode, sub-protocol to echo), preferring smux_on like gorilla's Upgrader;
    (None, None) when the client names neither."""
    if header:
        offered = {item.strip() for item in header.split(",")}
        if SMUX_ON in offered:
            return MuxProtocol.SMUX, SMUX_ON
        if SMUX_OFF in offered:
            return MuxProtocol.NONE, SMUX_OFF
    return None, None


def mode_for(
    asked: MuxProtocol | None, user_mux: MuxProtocol | None, server_default: MuxProtocol
) -> MuxProtocol:
    """What a tunnel carries: the client's sub-protocol (smux_on, smux_off), else
    the user's "mux", else the server's -mux-protocol (docs/protocol.md §3)."""
    if asked is not None:
        return asked
    return user_mux if user_mux is not None else server_default


def upgrade_problem(head: RequestHead) -> str | None:
    """Why this is not a WebSocket upgrade we accept (RFC 6455 §4.2.1), or None."""
    if head.method != b"GET":
        return f"method {head.method.decode('latin-1')}"
    headers: dict[bytes, list[bytes]] = {}
    for name, value in head.headers:
        headers.setdefault(name, []).append(value)
    upgrade = b",".join(headers.get(b"upgrade", [])).lower()
    if b"websocket" not in [v.strip() for v in upgrade.split(b",")]:
        return "no Upgrade: websocket"
    connection = b",".join(headers.get(b"connection", [])).lower()
    if b"upgrade" not in [v.strip() for v in connection.split(b",")]:
        return "no Connection: upgrade"
    if headers.get(b"sec-websocket-version") != [b"13"]:
        return "Sec-WebSocket-Version is not 13"
    keys = headers.get(b"sec-websocket-key", [])
    try:
        if len(keys) != 1 or len(b64decode(keys[0], validate=True)) != 16:
            return "bad Sec-WebSocket-Key"
    except (binascii.Error, ValueError):
        return "bad Sec-WebSocket-Key"
    return None


def head_size(head: RequestHead) -> int:
    """The size of the request head as sent (request line, headers, CRLFs)."""
    size = len(head.method) + len(head.target) + len(b"  HTTP/1.1\r\n\r\n")
    return size + sum(len(name) + len(value) + 4 for name, value in head.headers)


def canonical_upgrade(head: RequestHead, with_protocols: bool = True) -> bytes:
    """The request as the WebSocket layer gets it: only what the tunnel needs,
    in the one spelling its parser accepts (without Sec-WebSocket-Protocol
    when it held early data, which that layer has no use for)."""
    headers = {name: value for name, value in head.headers}
    lines = [
        b"GET " + head.target + b" HTTP/1.1",
        b"Host: " + headers.get(b"host", b"localhost"),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + headers[b"sec-websocket-key"],
        b"Sec-WebSocket-Version: 13",
    ]
    protocols = [value for name, value in head.headers if name == b"sec-websocket-protocol"]
    if protocols and with_protocols:
        lines.append(b"Sec-WebSocket-Protocol: " + b", ".join(protocols))
    return b"\r\n".join(lines) + b"\r\n\r\n"
