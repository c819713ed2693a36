"""The request-head verdicts, as a table: request head as sent -> what the
server does with it. The head is parsed by h11 as the front layer parses it;
the verdict is sans-I/O, so no server, socket or clock is involved.

The users are /user, "/a b" and "/\u4f60". The sub-protocol picks the mode; a
client that names none leaves it to the route (the user's "mux", the server's
-mux-protocol), which mode_for() decides.
"""

from __future__ import annotations

from base64 import urlsafe_b64encode
from dataclasses import dataclass, field

import h11
import pytest

from mtt.accept.front import request_head_of
from mtt.config import Limits
from mtt.core.users import MuxProtocol
from mtt.wire.nginx_pages import TO_HTTPS_PAGE, http09_page, http_response
from mtt.wire.origin import OriginPolicy
from mtt.wire.request_head import (
    BadRequest,
    Forbidden,
    NotFound,
    PlainHttpOnTlsPort,
    ToFallback,
    Upgrade,
    Verdict,
    canonical_upgrade,
    head_size,
    mode_for,
    verdict,
)

NONE, SMUX, MUXCOOL = MuxProtocol.NONE, MuxProtocol.SMUX, MuxProtocol.MUXCOOL
USERS = {"/user", "/a b", "/\u4f60"}
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample: 16 bytes in base64


def request(
    target: str = "/user",
    *,
    method: str = "GET",
    http: str = "HTTP/1.1",
    host: str | None = "tunnel.test",
    upgrade: str | None = "websocket",
    connection: str | None = "Upgrade",
    key: str | None = KEY,
    version: str | None = "13",
    protocols: tuple[str, ...] = ("smux_off",),
    extra: tuple[str, ...] = (),
) -> bytes:
    """An RFC 6455 opening handshake, with any part left out or changed."""
    lines = [f"{method} {target} {http}"]
    for name, value in [
        ("Host", host),
        ("Upgrade", upgrade),
        ("Connection", connection),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", version),
        *(("Sec-WebSocket-Protocol", p) for p in protocols),
    ]:
        if value is not None:
            lines.append(f"{name}: {value}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def plain(target: str = "/user", *, method: str = "GET", http: str = "HTTP/1.1") -> bytes:
    """A request with no upgrade at all, as a browser or a scanner sends it."""
    return f"{method} {target} {http}\r\nHost: tunnel.test\r\nAccept: */*\r\n\r\n".encode()


def canonical(target: str, protocols: str | None = "smux_off", host: str = "tunnel.test") -> bytes:
    """The head the WebSocket layer must get for an accepted upgrade."""
    head = (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    )
    if protocols is not None:
        head += f"Sec-WebSocket-Protocol: {protocols}\r\n"
    return (head + "\r\n").encode()


@dataclass(frozen=True)
class Context:
    """The server-side inputs of a verdict other than the head."""

    keep_alive_allowed: bool = True
    fallback: bool = False
    on_tls_port: bool = False
    users: frozenset[str] = field(default=frozenset(USERS))
    origins: tuple[str, ...] = ()  # -allow-origin


FALLBACK = Context(fallback=True)
TLS_PORT = Context(on_tls_port=True)
LAST_REQUEST = Context(keep_alive_allowed=False)
PANEL = Context(origins=("https://panel.example.com", "http://127.0.0.1:8000"))
MAX_EARLY_DATA = Limits().max_early_data


def ed(data: bytes) -> str:
    """Early data as Xray's dialer puts it in Sec-WebSocket-Protocol (RawURLEncoding)."""
    return urlsafe_b64encode(data).decode().rstrip("=")


EARLY = bytes(range(256)) * 8  # 2048 bytes, every value: the alphabet's - and _ appear


def decide(raw: bytes, context: Context = Context()) -> Verdict:
    """Parse raw as the front layer does (h11, the same size cap), then decide."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    connection.receive_data(raw)
    event = connection.next_event()
    assert isinstance(event, h11.Request), event
    return verdict(
        request_head_of(event),
        route_exists=context.users.__contains__,
        max_head=MAX_REQUEST_HEAD,
        max_early_data=MAX_EARLY_DATA,
        keep_alive_allowed=context.keep_alive_allowed,
        fallback=context.fallback,
        on_tls_port=context.on_tls_port,
        origins=OriginPolicy(context.origins),
    )


def not_websocket(problem: str, key: str = "/user", **kw: bool) -> NotFound:
    return NotFound(
        f"{key}: not a WebSocket upgrade ({problem})",
        "not_websocket",
        head_only=kw.get("head_only", False),
        keep_alive=kw.get("keep_alive", True),
    )


def unknown(shown: str, **kw: bool) -> NotFound:
    return NotFound(
        f"no user for path {shown}",
        "unknown_path",
        head_only=kw.get("head_only", False),
        keep_alive=kw.get("keep_alive", True),
    )


_LONG = "/" + "x" * 300
MAX_REQUEST_HEAD = Limits().max_request_head
_PADDING = "X-Padding: " + "p" * (MAX_REQUEST_HEAD - len(request()) - len("X-Padding: \r\n"))
_AT_THE_CAP = request(extra=(_PADDING,))
_OVER_THE_CAP = request(extra=(_PADDING + "p",))

TABLE: list[tuple[str, bytes, Context, Verdict]] = [
    # -- upgrades on a user's path: the sub-protocol picks the mode -----------------------
    ("smux_off", request(), Context(), Upgrade("/user", NONE, "smux_off", canonical("/user"))),
    (
        "smux_on",
        request(protocols=("smux_on",)),
        Context(),
        Upgrade("/user", SMUX, "smux_on", canonical("/user", "smux_on")),
    ),
    (
        "no sub-protocol: the route decides",
        request(protocols=()),
        Context(),
        Upgrade("/user", None, None, canonical("/user", None)),
    ),
    (
        "both offered: smux_on wins",
        request(protocols=("smux_off, smux_on",)),
        Context(),
        Upgrade("/user", SMUX, "smux_on", canonical("/user", "smux_off, smux_on")),
    ),
    (
        "offers in two headers",
        request(protocols=("chat", "smux_on")),
        Context(),
        Upgrade("/user", SMUX, "smux_on", canonical("/user", "chat, smux_on")),
    ),
    (
        "an unknown sub-protocol that is not base64 is not echoed and leaves it to the route",
        request(protocols=("v1.chat",)),
        Context(),
        Upgrade("/user", None, None, canonical("/user", "v1.chat")),
    ),
    (
        "a list of unknown sub-protocols is not early data",
        request(protocols=("chat, superchat",)),
        Context(),
        Upgrade("/user", None, None, canonical("/user", "chat, superchat")),
    ),
    # -- early data in Sec-WebSocket-Protocol (docs/protocol.md §10) -----------------------
    (
        "early data: 2048 bytes, echoed, not in the head the WebSocket layer gets",
        request(protocols=(ed(EARLY),)),
        Context(),
        Upgrade("/user", NONE, ed(EARLY), canonical("/user", None), EARLY),
    ),
    (
        "early data at the bound",
        request(protocols=(ed(b"\xff" * MAX_EARLY_DATA),)),
        Context(),
        Upgrade(
            "/user",
            NONE,
            ed(b"\xff" * MAX_EARLY_DATA),
            canonical("/user", None),
            b"\xff" * MAX_EARLY_DATA,
        ),
    ),
    (
        "early data one byte over the bound",
        request(protocols=(ed(b"\xff" * (MAX_EARLY_DATA + 1)),)),
        Context(),
        BadRequest(f"/user: early data of {MAX_EARLY_DATA + 1} bytes over the 3072-byte bound"),
    ),
    (
        "early data on an unknown path: the 404, as without it",
        request("/nobody", protocols=(ed(b"\xff" * (MAX_EARLY_DATA + 1)),)),
        Context(),
        unknown('"/nobody"'),
    ),
    (
        "early data in the standard alphabet, padded: taken as Xray's server takes it",
        request(protocols=("+/8=",)),
        Context(),
        Upgrade("/user", NONE, "+/8=", canonical("/user", None), b"\xfb\xff"),
    ),
    (
        "a sub-protocol name that decodes is early data, as at Xray's server",
        request(protocols=("chat",)),
        Context(),
        Upgrade("/user", NONE, "chat", canonical("/user", None), b"r\x16\xad"),
    ),
    (
        "smux_on decodes too, but is the sub-protocol",
        request(protocols=("smux_on",)),
        Context(),
        Upgrade("/user", SMUX, "smux_on", canonical("/user", "smux_on")),
    ),
    (
        "early data with the path's ?ed= left on (clients that do not know it)",
        request("/user?ed=2048", protocols=(ed(b"vless"),)),
        Context(),
        Upgrade("/user", NONE, ed(b"vless"), canonical("/user?ed=2048", None), b"vless"),
    ),
    # -- -allow-origin: browsers from listed origins only ----------------------------------
    (
        "any origin without -allow-origin",
        request(extra=("Origin: https://elsewhere.example",)),
        Context(),
        Upgrade("/user", NONE, "smux_off", canonical("/user")),
    ),
    (
        "a listed origin",
        request(extra=("Origin: https://panel.example.com",)),
        PANEL,
        Upgrade("/user", NONE, "smux_off", canonical("/user")),
    ),
    (
        "a listed origin, as a browser would never spell it",
        request(extra=("Origin: HTTPS://Panel.Example.COM:443",)),
        PANEL,
        Upgrade("/user", NONE, "smux_off", canonical("/user")),
    ),
    (
        "no Origin: not a browser, let in",
        request(),
        PANEL,
        Upgrade("/user", NONE, "smux_off", canonical("/user")),
    ),
    (
        "an origin not listed",
        request(extra=("Origin: https://elsewhere.example",)),
        PANEL,
        Forbidden('/user: origin "https://elsewhere.example" not allowed'),
    ),
    (
        "a listed host on another port",
        request(extra=("Origin: http://127.0.0.1:8001",)),
        PANEL,
        Forbidden('/user: origin "http://127.0.0.1:8001" not allowed'),
    ),
    (
        "a listed host with another scheme",
        request(extra=("Origin: http://panel.example.com",)),
        PANEL,
        Forbidden('/user: origin "http://panel.example.com" not allowed'),
    ),
    (
        "an opaque origin",
        request(extra=("Origin: null",)),
        PANEL,
        Forbidden('/user: origin "null" not allowed'),
    ),
    (
        "an origin not listed, with a fallback: still the 403",
        request(extra=("Origin: https://elsewhere.example",)),
        Context(fallback=True, origins=PANEL.origins),
        Forbidden('/user: origin "https://elsewhere.example" not allowed'),
    ),
    (
        "an origin not listed on an unknown path: the 404",
        request("/nobody", extra=("Origin: https://elsewhere.example",)),
        PANEL,
        unknown('"/nobody"'),
    ),
    (
        "an origin not listed on a GET that is no upgrade: the 404",
        request(upgrade=None, extra=("Origin: https://elsewhere.example",)),
        PANEL,
        not_websocket("no Upgrade: websocket"),
    ),
    # -- the routing key: path only, percent-decoded ---------------------------------------
    (
        "query string ignored",
        request("/user?x=1&y"),
        Context(),
        Upgrade("/user", NONE, "smux_off", canonical("/user?x=1&y")),
    ),
    (
        "percent-decoded",
        request("/a%20b"),
        Context(),
        Upgrade("/a b", NONE, "smux_off", canonical("/a%20b")),
    ),
    (
        "percent-decoded UTF-8",
        request("/%E4%BD%A0"),
        Context(),
        Upgrade("/\u4f60", NONE, "smux_off", canonical("/%E4%BD%A0")),
    ),
    (
        "absolute-form target",
        request("http://tunnel.test/user?x"),
        Context(),
        Upgrade("/user", NONE, "smux_off", canonical("http://tunnel.test/user?x")),
    ),
    (
        "absolute-form https target",
        request("https://tunnel.test/user"),
        Context(),
        Upgrade("/user", NONE, "smux_off", canonical("https://tunnel.test/user")),
    ),
    ("trailing slash is another path", request("/user/"), Context(), unknown('"/user/"')),
    ("bad escape", request("/user%zz"), Context(), unknown('"/user%zz"')),
    ("escape that is not UTF-8", request("/%ff"), Context(), unknown('"/%ff"')),
    ("case matters", request("/USER"), Context(), unknown('"/USER"')),
    ("unknown path", request("/nobody"), Context(), unknown('"/nobody"')),
    ("a long path is cut in the log", request(_LONG), Context(), unknown(f'"{_LONG[:200]}..."')),
    # -- the spellings an upgrade may take ---------------------------------------------------
    (
        "tokens in lists, any case",
        request(upgrade="WebSocket", connection="keep-alive, Upgrade"),
        Context(),
        Upgrade("/user", NONE, "smux_off", canonical("/user")),
    ),
    (
        "HTTP/1.0 without Host: the WebSocket layer still gets one",
        request(http="HTTP/1.0", host=None),
        Context(),
        Upgrade("/user", NONE, "smux_off", canonical("/user", host="localhost")),
    ),
    (
        "HTTP/1.0 with the upgrade headers",
        request(http="HTTP/1.0"),
        Context(),
        Upgrade("/user", NONE, "smux_off", canonical("/user")),
    ),
    # -- not an upgrade on a user's path: the same 404 as an unknown path ------------------
    ("GET of a user's path", plain(), Context(), not_websocket("no Upgrade: websocket")),
    ("POST", request(method="POST"), Context(), not_websocket("method POST")),
    (
        "HEAD: the head alone",
        plain(method="HEAD"),
        Context(),
        not_websocket("method HEAD", head_only=True),
    ),
    (
        "HEAD of an unknown path",
        plain("/nobody", method="HEAD"),
        Context(),
        unknown('"/nobody"', head_only=True),
    ),
    ("Upgrade: h2c", request(upgrade="h2c"), Context(), not_websocket("no Upgrade: websocket")),
    ("no Upgrade", request(upgrade=None), Context(), not_websocket("no Upgrade: websocket")),
    ("no Connection", request(connection=None), Context(), not_websocket("no Connection: upgrade")),
    (
        "Connection without the upgrade token",
        request(connection="keep-alive"),
        Context(),
        not_websocket("no Connection: upgrade"),
    ),
    (
        "Connection: close, no upgrade token",
        request(connection="close"),
        Context(),
        not_websocket("no Connection: upgrade", keep_alive=False),
    ),
    (
        "version 8",
        request(version="8"),
        Context(),
        not_websocket("Sec-WebSocket-Version is not 13"),
    ),
    (
        "no version",
        request(version=None),
        Context(),
        not_websocket("Sec-WebSocket-Version is not 13"),
    ),
    (
        "two versions",
        request(extra=("Sec-WebSocket-Version: 13",)),
        Context(),
        not_websocket("Sec-WebSocket-Version is not 13"),
    ),
    ("no key", request(key=None), Context(), not_websocket("bad Sec-WebSocket-Key")),
    (
        "key not base64",
        request(key="not a key!"),
        Context(),
        not_websocket("bad Sec-WebSocket-Key"),
    ),
    (
        "key of 8 bytes",
        request(key="a2tra2tra2s="),
        Context(),
        not_websocket("bad Sec-WebSocket-Key"),
    ),
    (
        "two keys",
        request(extra=(f"Sec-WebSocket-Key: {KEY}",)),
        Context(),
        not_websocket("bad Sec-WebSocket-Key"),
    ),
    # -- keep-alive, as nginx -----------------------------------------------------------------
    (
        "HTTP/1.0: close",
        plain(http="HTTP/1.0"),
        Context(),
        not_websocket("no Upgrade: websocket", keep_alive=False),
    ),
    (
        "Connection: close",
        request("/nobody", connection="close"),
        Context(),
        unknown('"/nobody"', keep_alive=False),
    ),
    (
        "the last request of a connection",
        plain("/nobody"),
        LAST_REQUEST,
        unknown('"/nobody"', keep_alive=False),
    ),
    # -- a fallback site takes what would be a 404 -------------------------------------------
    (
        "fallback: unknown path",
        request("/nobody"),
        FALLBACK,
        ToFallback('no user for path "/nobody"', "unknown_path"),
    ),
    (
        "fallback: GET of a user's path",
        plain(),
        FALLBACK,
        ToFallback("/user: not a WebSocket upgrade (no Upgrade: websocket)", "not_websocket"),
    ),
    (
        "fallback: a valid upgrade is still a tunnel",
        request(),
        FALLBACK,
        Upgrade("/user", NONE, "smux_off", canonical("/user")),
    ),
    # -- plain HTTP sent to the TLS port: nginx's 400 whatever the path ---------------------
    ("TLS port: a valid upgrade", request(), TLS_PORT, PlainHttpOnTlsPort(head_only=False)),
    ("TLS port: unknown path", plain("/nobody"), TLS_PORT, PlainHttpOnTlsPort(head_only=False)),
    ("TLS port: HEAD", plain(method="HEAD"), TLS_PORT, PlainHttpOnTlsPort(head_only=True)),
    # -- the size cap comes before routing: it tells nothing about paths -------------------
    (
        "a head of exactly the cap",
        _AT_THE_CAP,
        Context(),
        Upgrade("/user", NONE, "smux_off", canonical("/user")),
    ),
    (
        "one byte over: user path",
        _OVER_THE_CAP,
        Context(),
        BadRequest("request head larger than 16 KiB"),
    ),
    (
        "one byte over: unknown path",
        request("/nobody", extra=(_PADDING + "p",)),
        Context(),
        BadRequest("request head larger than 16 KiB"),
    ),
    (
        "one byte over: with a fallback",
        _OVER_THE_CAP,
        FALLBACK,
        BadRequest("request head larger than 16 KiB"),
    ),
    (
        "one byte over: TLS port",
        _OVER_THE_CAP,
        TLS_PORT,
        BadRequest("request head larger than 16 KiB"),
    ),
]


@pytest.mark.parametrize(
    ("raw", "context", "expected"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_verdict(raw: bytes, context: Context, expected: Verdict) -> None:
    assert decide(raw, context) == expected


@pytest.mark.parametrize(
    "raw",
    [
        request(host=None),
        request(extra=("Host: other.test",)),
        request(extra=("broken",)),
        request(extra=("Name : value",)),
        request(extra=("Content-Length: 1", "Content-Length: 2")),
        request("/user\x01"),
        b"GARBAGE\r\n\r\n",
    ],
    ids=[
        "HTTP/1.1 without Host",
        "two Hosts",
        "header line without a colon",
        "space before the colon",
        "conflicting Content-Length",
        "control byte in the target",
        "no request line",
    ],
)
def test_heads_that_never_reach_a_verdict(raw: bytes) -> None:
    """Malformed heads: the parser refuses them, and the front layer answers
    nginx's 400 whatever the path (tests/integration/test_hostile.py)."""
    with pytest.raises(h11.RemoteProtocolError):
        decide(raw)


def test_the_cap_rows_are_where_they_say() -> None:
    """The size rows measure what they claim: the head as sent, CRLFs included."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    connection.receive_data(_AT_THE_CAP)
    event = connection.next_event()
    assert isinstance(event, h11.Request)
    assert head_size(request_head_of(event)) == len(_AT_THE_CAP) == MAX_REQUEST_HEAD
    assert len(_OVER_THE_CAP) == MAX_REQUEST_HEAD + 1


def test_canonical_head_drops_everything_else() -> None:
    """Only the headers the tunnel needs reach the WebSocket layer, in one spelling."""
    raw = request(
        "/user?q",
        upgrade="WebSocket",
        connection="keep-alive, Upgrade",
        protocols=("smux_on",),
        extra=("Cookie: a=b", "X-Forwarded-For: 192.0.2.1", "Origin: http://x"),
    )
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw)
    event = connection.next_event()
    assert isinstance(event, h11.Request)
    assert canonical_upgrade(request_head_of(event)) == (
        b"GET /user?q HTTP/1.1\r\nHost: tunnel.test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY.encode() + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: smux_on\r\n\r\n"
    )


DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
PAGE_404 = (
    b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
    b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def test_nginx_404() -> None:
    assert http_response(404, DATE, keep_alive=True) == (
        b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\nDate: " + DATE.encode() + b"\r\n"
        b"Content-Type: text/html\r\nContent-Length: 146\r\nConnection: keep-alive\r\n\r\n"
        + PAGE_404
    )
    assert len(PAGE_404) == 146


def test_nginx_head_only_answer_announces_the_page() -> None:
    assert http_response(404, DATE, head_only=True) == (
        b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\nDate: " + DATE.encode() + b"\r\n"
        b"Content-Type: text/html\r\nContent-Length: 146\r\nConnection: close\r\n\r\n"
    )


def test_nginx_plain_http_to_tls_port_answer() -> None:
    answer = http_response(400, DATE, body=TO_HTTPS_PAGE)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert f"Content-Length: {len(TO_HTTPS_PAGE)}\r\n".encode() in answer
    assert answer.endswith(b"\r\n\r\n" + TO_HTTPS_PAGE)
    assert b"The plain HTTP request was sent to HTTPS port" in TO_HTTPS_PAGE


def test_nginx_http09_answers_are_pages_alone() -> None:
    assert http09_page(b"GET") == TO_HTTPS_PAGE
    assert http09_page(b"POST").startswith(b"<html>\r\n<head><title>400 Bad Request</title>")


@pytest.mark.parametrize(
    ("asked", "user_mux", "server_default", "mode"),
    [
        (SMUX, MUXCOOL, NONE, SMUX),  # smux_on: the client's word wins
        (NONE, MUXCOOL, SMUX, NONE),  # smux_off
        (None, MUXCOOL, NONE, MUXCOOL),  # no sub-protocol: the user's "mux" ...
        (None, NONE, SMUX, NONE),
        (None, None, MUXCOOL, MUXCOOL),  # ... else -mux-protocol
        (None, None, NONE, NONE),
    ],
)
def test_the_mode_of_a_tunnel(
    asked: MuxProtocol | None,
    user_mux: MuxProtocol | None,
    server_default: MuxProtocol,
    mode: MuxProtocol,
) -> None:
    assert mode_for(asked, user_mux, server_default) is mode
