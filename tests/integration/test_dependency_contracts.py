"""What mtt assumes of its dependencies beyond their documented API, on a loop.

Each test drives the dependency the way one of our modules does (subclass hooks,
undocumented classes, behaviours we build on) over loopback sockets, and fails
with a message naming that module when an upgrade changes the assumption
(docs/dependencies.md lists them all; tests/unit/test_dependency_contracts.py
has the ones without a loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import aiofastnet
import pytest
import uvloop
from cryptography import x509
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSTransport,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from mtt.accept.first_bytes import FirstBytes
from mtt.accept.tunnel_server import TunnelServer, _UnixWSProtocol
from mtt.address import Destination
from mtt.client.dialer import ResumingContext
from mtt.config import Limits
from mtt.controller import http as controller_http
from mtt.controller.http import ControllerSettings, start_controller
from mtt.core.commands import RES_ERR, RES_OK
from mtt.core.users import MuxProtocol
from mtt.service.user_service import UserService
from mtt.store.memory import MemoryStore
from mtt.transport.dst import dial as dial_dst
from mtt.transport.tls import (
    alpn_challenge_pem,
    challenge_context,
    context_from_pem,
    self_signed_pem,
)
from mtt.transport.wsframe import write_binary
from mtt.wire.request_head import Upgrade
from tests.integration.test_controller_bounds import post, read_reply
from tests.support import controller_limits
from tests.unit.test_first_bytes import SSLV3_HELLO

WAIT = 10.0  # bound on every read; the tests finish in milliseconds
UPGRADE = (
    b"GET /u HTTP/1.1\r\nHost: tunnel.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def relied_on_by(module: str, what: str) -> str:
    return f"{module} relies on {what}; see docs/dependencies.md"


@pytest.fixture(scope="module")
def server_ctx() -> ssl.SSLContext:
    return context_from_pem(*self_signed_pem("tunnel.test"))


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, client side) of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with server, client:
        server.setblocking(False)
        client.setblocking(False)
        yield server, client


def own(sock: socket.socket) -> socket.socket:
    """The same connection as a new socket object the transport owns (and closes)."""
    return socket.socket(sock.family, sock.type, fileno=sock.detach())


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), WAIT):
            data += chunk
    return data


class AppStub(asyncio.Protocol):
    """Stands for FrontProtocol above the TLS layer: records what reaches it."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.made = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.made.set_result(None)


# --- aiofastnet: TLS made over an existing transport (first_bytes.py) -----------


async def test_aiofastnet_calls_our_force_close_with_the_handshake_error(
    server_ctx: ssl.SSLContext, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    why = relied_on_by(
        "mtt.accept.first_bytes._AlertingTLS",
        "SSLTransport_Transport(loop, app, ctx, server_side, timeouts, bio sizes, waiter=) "
        "dispatching its cpdef _force_close to a Python override on a failed handshake",
    )
    loop = asyncio.get_running_loop()
    server_sock, client_sock = tcp_pair
    app = AppStub()
    await aiofastnet.connect_accepted_socket(
        loop, lambda: FirstBytes(app, server_ctx, Limits(handshake_timeout=WAIT)), own(server_sock)
    )
    reader, writer = await asyncio.open_connection(sock=own(client_sock))
    writer.write(SSLV3_HELLO)
    reply = await read_to_eof(reader)
    writer.close()
    assert reply[:1] == b"\x15", why  # the alert OpenSSL wrote, sent by our override
    assert not app.made.done()


async def test_aiofastnet_tls_layer_hands_a_tls_transport_to_the_app(
    server_ctx: ssl.SSLContext, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    why = relied_on_by(
        "mtt.accept.first_bytes._to_tls and mtt.transport.delivery",
        "get_tls_protocol() taking bytes fed by hand, get_extra_info('cipher') set only "
        "after the handshake, get_local_write_buffer_size() on the TLS transport",
    )
    loop = asyncio.get_running_loop()
    server_sock, client_sock = tcp_pair
    app = AppStub()
    await aiofastnet.connect_accepted_socket(
        loop, lambda: FirstBytes(app, server_ctx, Limits(handshake_timeout=WAIT)), own(server_sock)
    )
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(
        sock=own(client_sock), ssl=client_ctx, server_hostname="tunnel.test"
    )
    await asyncio.wait_for(app.made, WAIT)
    tls = app.transport
    assert tls.get_extra_info("cipher") is not None, why
    assert int(tls.get_local_write_buffer_size()) >= 0, why
    assert tls._hello is None, why  # handshake_over ran: the waiter future completed
    tls.close()
    writer.close()


@pytest.mark.parametrize("alpn", [["acme-tls/1"], ["http/1.1"]])
async def test_pythons_alpn_callback_answers_on_aiofastnet_connections(
    server_ctx: ssl.SSLContext, tcp_pair: tuple[socket.socket, socket.socket], alpn: list[str]
) -> None:
    why = relied_on_by(
        "mtt.transport.tls.challenge_context",
        "ssl.SSLContext.set_alpn_protocols' server callback working on aiofastnet's "
        "connections, which have no Python SSL object (it reads the context's list)",
    )
    loop = asyncio.get_running_loop()
    server_sock, client_sock = tcp_pair
    app = AppStub()
    challenge_pem, challenge_key = alpn_challenge_pem("tunnel.test", "token.thumbprint")
    challenges = {"tunnel.test": challenge_context(challenge_pem, challenge_key, "tunnel.test")}
    await aiofastnet.connect_accepted_socket(
        loop,
        lambda: FirstBytes(app, server_ctx, Limits(handshake_timeout=WAIT), None, challenges),
        own(server_sock),
    )
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.set_alpn_protocols(alpn)
    _, writer = await asyncio.open_connection(
        sock=own(client_sock), ssl=client_ctx, server_hostname="tunnel.test"
    )
    await asyncio.wait_for(app.made, WAIT)
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.selected_alpn_protocol() == alpn[0], why
    served = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))
    is_challenge = served == x509.load_pem_x509_certificate(challenge_pem)
    assert is_challenge == (alpn == ["acme-tls/1"]), why
    app.transport.close()
    writer.close()


# --- picows: WSProtocol as tunnel_server.py and front.py build and feed it ---------


class RecordingListener(WSListener):  # type: ignore[misc]
    def __init__(self, on_connected: Any = None) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.on_connected = on_connected
        self.disconnected = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.on_connected is not None:
            self.on_connected(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        pass

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(None)


def tunnel_server(limits: Limits, unix: bool, listener: RecordingListener | None) -> TunnelServer:
    """A TunnelServer whose routes find no user, or give every upgrade to `listener`."""
    agent = SimpleNamespace(table=SimpleNamespace(lookup=lambda key: None), abandon=print)
    server = TunnelServer(agent, limits, default_mux=MuxProtocol.NONE, ssl_context=None)  # type: ignore[arg-type]
    server.unix = unix
    if listener is not None:
        server._route = lambda *args: WSUpgradeResponseWithListener(  # type: ignore[method-assign]
            WSUpgradeResponse.create_101_response(), listener
        )
    return server


async def hand_over(server: TunnelServer, sock: socket.socket, request: bytes) -> Any:
    """What FrontProtocol._hand_over does: swap in the WebSocket layer, replay the head."""
    loop = asyncio.get_running_loop()
    transport, _ = await aiofastnet.connect_accepted_socket(loop, asyncio.Protocol, sock)
    front = SimpleNamespace(peer="127.0.0.1:1", client_ip="127.0.0.1")
    upgrade = Upgrade(key="/u", mode=None, subprotocol=None, head=request)
    ws_protocol = server._protocol_factory(front, upgrade, False)  # type: ignore[arg-type]
    transport.set_protocol(ws_protocol)
    ws_protocol.connection_made(transport)
    view = memoryview(request)
    while view:
        buffer = ws_protocol.get_buffer(len(view))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        ws_protocol.buffer_updated(n)
        view = view[n:]
    return ws_protocol


async def test_picows_protocol_subclass_serves_a_unix_socket_and_routes() -> None:
    why = relied_on_by(
        "mtt.accept.tunnel_server (_UnixWSProtocol, _protocol_factory) and front._hand_over",
        "picows.picows.WSProtocol's keyword arguments, its connection_made being overridable, "
        "get_buffer/buffer_updated and ws_listener_factory's error response",
    )
    server_sock, client_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with client_sock:
        server = tunnel_server(Limits(), unix=True, listener=None)
        ws_protocol = await hand_over(server, server_sock, UPGRADE)
        assert isinstance(ws_protocol, _UnixWSProtocol), why
        reader, writer = await asyncio.open_connection(sock=own(client_sock))
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        writer.close()
    assert reply.startswith(b"HTTP/1.1 404 "), (reply, why)
    assert b"Server: nginx" in reply, (reply, why)


async def test_picows_writes_its_frames_in_order_with_ours(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    why = relied_on_by(
        "mtt.transport.wsframe.write_binary and mtt.transport.wsbase",
        "picows writing pong and close frames straight to underlying_transport, "
        "so frames we write there ourselves keep their order",
    )

    def send_three(transport: WSTransport) -> None:
        transport.send_pong(b"p")
        write_binary(transport.underlying_transport, b"d")
        transport.send_close(WSCloseCode.OK)

    server_sock, client_sock = tcp_pair
    listener = RecordingListener(send_three)
    await hand_over(tunnel_server(Limits(), False, listener), own(server_sock), UPGRADE)
    reader, writer = await asyncio.open_connection(sock=own(client_sock))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    frames = await asyncio.wait_for(reader.readexactly(3 + 3 + 4), WAIT)
    writer.close()
    assert frames == b"\x8a\x01p" + b"\x82\x01d" + b"\x88\x02\x03\xe8", (frames, why)


async def test_picows_records_the_1009_it_sends_for_a_frame_too_big(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    why = relied_on_by(
        "mtt.transport.wsbase.CheckedListener (screen, picows_close_reason)",
        "picows sending 1009 for a frame over max_frame_size and showing it in "
        "is_close_frame_sent and close_handshake.sent",
    )
    server_sock, client_sock = tcp_pair
    listener = RecordingListener()
    await hand_over(
        tunnel_server(Limits(max_ws_frame=1024), False, listener), own(server_sock), UPGRADE
    )
    reader, writer = await asyncio.open_connection(sock=own(client_sock))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    payload = os.urandom(2048)
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    writer.write(b"\x82\xfe" + len(payload).to_bytes(2, "big") + mask + masked)
    rest = await read_to_eof(reader)
    writer.close()
    await asyncio.wait_for(listener.disconnected, WAIT)
    transport = listener.transport
    assert transport is not None
    assert rest[:4] == b"\x88" + bytes([len(rest) - 2]) + b"\x03\xf1", (rest, why)
    assert transport.is_close_frame_sent, why
    sent = transport.close_handshake.sent
    assert sent is not None and sent.code is WSCloseCode.MESSAGE_TOO_BIG, why


# --- uvloop: its TLS layer goes through SSLContext.wrap_bio (client/dialer.py) -----


def test_uvloop_tls_builds_its_ssl_object_through_wrap_bio(server_ctx: ssl.SSLContext) -> None:
    why = relied_on_by(
        "mtt.client.dialer.ResumingContext",
        "uvloop's TLS layer calling SSLContext.wrap_bio, so an override can offer a session",
    )

    class Counting(ResumingContext):
        calls = 0

        def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
            Counting.calls += 1
            return super().wrap_bio(*args, **kwargs)

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        await writer.drain()
        writer.close()

    async def connect_twice() -> list[bool]:
        ctx = Counting(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reused = []
        async with server:
            for _ in range(2):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="tunnel.test"
                )
                assert await asyncio.wait_for(reader.read(2), WAIT) == b"hi"
                await read_to_eof(reader)  # the ticket comes with the data
                ssl_object = writer.get_extra_info("ssl_object")
                reused.append(bool(ssl_object.session_reused))
                ctx.remember(ssl_object)
                writer.close()
        return reused

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reused = runner.run(connect_twice())
    assert Counting.calls == 2, why
    assert reused == [False, True], why


# --- uvloop: TCP_NODELAY on the connections it dials (transport/dst.py) --------------


def test_uvloop_dials_with_tcp_nodelay() -> None:
    why = relied_on_by(
        "mtt.transport.dst.DstConnection",
        "uvloop setting TCP_NODELAY on create_connection's TCP transports (dst writes of "
        "small frames must not wait for an ACK)",
    )

    async def dial() -> int:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            owner = SimpleNamespace(dst_connected=lambda conn: None, dst_lost=lambda exc: None)
            conn = await dial_dst(owner, Destination("127.0.0.1", port), WAIT, 65536)  # type: ignore[arg-type]
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            value = int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            conn.abort()
            return value

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(dial()) != 0, why


# --- aiohttp: the controller's RequestHandler and Server subclasses ---------------


@contextlib.asynccontextmanager
async def controller(
    **settings: Any,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    service = UserService(MemoryStore())
    await service.start()
    runner, where = await start_controller(
        "127.0.0.1:0", service, ControllerSettings(limits=controller_limits(**settings))
    )
    host, port = where.rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        yield reader, writer
        writer.close()
    finally:
        await runner.cleanup()
        await service.close()


async def test_aiohttp_calls_our_request_factory_before_the_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    why = relied_on_by(
        "mtt.controller.http._ControllerServer/_ControllerHandler",
        "AppRunner._make_server, Server._loop/_kwargs, Server.__call__ building the "
        "connection and request_factory being called once a head is parsed",
    )
    armed: list[bool] = []
    original = controller_http._ControllerHandler.head_parsed

    def head_parsed(self: Any) -> None:
        armed.append(self._head_timer is not None)
        original(self)

    monkeypatch.setattr(controller_http._ControllerHandler, "head_parsed", head_parsed)
    async with controller() as (reader, writer):
        writer.write(post(b'{"opt":9}'))
        status, body = await read_reply(reader)
        assert status == 200 and body["res"] == RES_OK, body
        assert armed == [True], why  # called by the request factory, while connected


async def test_aiohttp_sends_parser_errors_through_handle_error() -> None:
    why = relied_on_by(
        "mtt.controller.http._ControllerHandler.handle_error",
        "aiohttp answering a request its parser refuses from RequestHandler.handle_error",
    )
    async with controller() as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: c\r\nContent-Length: nope\r\n\r\n")
        status, body = await read_reply(reader)
    assert status == 400, why
    assert body["res"] == RES_ERR and "malformed HTTP request" in json.dumps(body), (body, why)


async def test_aiohttp_request_protocol_can_be_closed_after_a_reply() -> None:
    why = relied_on_by(
        "mtt.controller.http._reply_and_close",
        "request.protocol.force_close() closing at once after a reply",
    )
    async with controller(body_timeout=0.05) as (reader, writer):
        writer.write(post(b'{"opt":9}')[:-3])  # the body never completes
        status, _ = await read_reply(reader)
        assert status == 408
        assert await read_to_eof(reader) == b"", why
