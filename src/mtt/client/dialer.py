"""Opening WebSockets to the tunnel server the way the Go mtt-client does.

The Go client dials `-s` but builds its URL from the server name:
`wss://<name><path>`, so SNI and the Host header carry the name, not the
address (docs/protocol.md §2). The sub-protocol says whether an smux session
follows (§3). TCP connect, TLS and the upgrade share one 10 s deadline, like
gorilla's HandshakeTimeout.

TLS resumption: asyncio's create_connection takes no session, but both
uvloop's and asyncio's TLS layers create their SSLObject through
``SSLContext.wrap_bio``. ResumingContext overrides it to offer the session
of the last successful handshake, so new connections resume (one round trip
and no certificate check) wherever the server issues tickets. picows' other
TLS backend (aiofastnet) builds its SSL objects in C without a session, so
the dialer asks picows for the event loop's own TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable

from picows import WSHandshakeError, WSListener, WSProtocolError, WSTransport, ws_connect

from mtt.client import ClientConfig
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.client")

SMUX_ON = "smux_on"
SMUX_OFF = "smux_off"


class ResumingContext(ssl.SSLContext):
    """A client context that offers the last session it was given."""

    last_session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            session = self.last_session
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session=session)

    def remember(self, ssl_object: ssl.SSLObject) -> None:
        """Keep the connection's session if it can be resumed (TLS 1.3 ticket, or 1.2)."""
        with contextlib.suppress(AttributeError, ValueError):
            session = ssl_object.session
            if session is not None and (session.has_ticket or ssl_object.version() != "TLSv1.3"):
                self.last_session = session


def client_context(insecure: bool) -> ResumingContext:
    """The one TLS context of the client: verified unless -sv, HTTP/1.1 by ALPN."""
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        # The system store; SSL_CERT_FILE / SSL_CERT_DIR override it as in OpenSSL.
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def url_host(name: str) -> str:
    """A host as it appears in a URL: an IPv6 literal gets brackets."""
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def describe_error(exc: BaseException, limit: float) -> str:
    """One short reason for a failed dial, for the log line."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {limit:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, WSHandshakeError):
        if exc.response is not None:
            return f"upgrade rejected: HTTP {exc.response.status}"
        return f"upgrade failed: {exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve server: {exc.strerror}"
    if isinstance(exc, OSError):
        if exc.errno:  # uvloop's sock_connect words its strerror "Connect call failed (...)"
            return os.strerror(exc.errno)
        if exc.strerror:
            return exc.strerror
    return str(exc) or type(exc).__name__


async def _retrieve_parser_error(transport: WSTransport) -> None:
    """picows keeps the error it disconnected for (a server frame too big, a bad
    frame) for wait_disconnected(), and already logged it: retrieve it, or asyncio
    logs a traceback for an exception never retrieved."""
    with contextlib.suppress(WSProtocolError):
        await transport.wait_disconnected()


class Dialer:
    """Opens WebSockets to the configured server; counts handshakes and resumptions."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.limits = config.limits
        self.url = f"wss://{url_host(config.server_name)}{config.path}"
        self.context = client_context(config.insecure)
        self.handshakes = 0
        self.resumed = 0
        # An adapter: handed a Logger, picows makes a child Logger per connection.
        self._logger = logging.LoggerAdapter(logging.getLogger("mtt.ws"))

    @property
    def target(self) -> str:
        """Where we dial, for log lines."""
        return f"{self.config.server}{self.config.path}"

    async def dial(
        self, listener_factory: Callable[[], WSListener], subprotocol: str
    ) -> WSTransport:
        """Connect, TLS, upgrade; raise OSError, ssl.SSLError, WSHandshakeError or TimeoutError.

        The listener's on_ws_connected has run when this returns.
        """
        limits = self.limits
        created: list[socket.socket] = []

        async def connect(_url: object) -> socket.socket:
            sock = await self._connect_tcp()
            created.append(sock)
            return sock

        try:
            async with asyncio.timeout(limits.handshake_timeout):
                transport, _ = await ws_connect(
                    listener_factory,
                    self.url,
                    ssl_context=self.context,
                    socket_factory=connect,
                    server_hostname=self.config.server_name,
                    use_aiofastnet=False,
                    disconnect_on_exception=True,
                    websocket_handshake_timeout=limits.handshake_timeout,
                    logger_name=self._logger,
                    enable_auto_ping=False,
                    enable_auto_pong=True,
                    max_frame_size=limits.max_ws_frame,
                    extra_headers={"Sec-WebSocket-Protocol": subprotocol},
                    max_redirects=0,
                    read_buffer_init_size=limits.ws_read_buffer,
                )
        except BaseException:
            # picows leaves the transport open when cancelled while waiting for the
            # upgrade reply; shutting the socket down makes it close itself. A socket
            # the transport already closed has fileno -1 and is left alone.
            for sock in created:
                if sock.fileno() != -1:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            raise
        self.handshakes += 1
        spawn(_retrieve_parser_error(transport), name=f"disconnect of {self.target}")
        ssl_object = transport.underlying_transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            if ssl_object.session_reused:
                self.resumed += 1
                log.debug("TLS session resumed (%d of %d)", self.resumed, self.handshakes)
            self.context.remember(ssl_object)
        return transport

    async def _connect_tcp(self) -> socket.socket:
        """A connected, non-blocking TCP socket to -s, trying each address in turn."""
        loop = asyncio.get_running_loop()
        server = self.config.server
        infos = await loop.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, type_, proto, _, address in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.config.fast_open and hasattr(socket, "TCP_FASTOPEN_CONNECT"):
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN_CONNECT, 1)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise last if last is not None else OSError(f"no address for {server.host}")
