"""The tunnel listener: TLS (or plain HTTP), the upgrade, and routing by path.

The route is resolved once, at upgrade time (docs/protocol.md §3): the tunnel keeps
its Destination, so a later change to the user table never touches it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Any

import aiofastnet
from picows import (
    WSListener,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSAutoPingStrategy, WSProtocol  # type: ignore[attr-defined]

from mtt.accept.fallback import Fallback
from mtt.accept.first_bytes import FirstBytes
from mtt.accept.front import PAGES, FrontProtocol
from mtt.accept.prelude import ProxyPrelude
from mtt.accept.tls_setup import TlsSpec
from mtt.config import Limits
from mtt.service.agent import Agent, TunnelAccount
from mtt.transport.mux import MuxTunnel
from mtt.transport.plain import PlainTunnel, TunnelRegistry
from mtt.transport.tls import load_pem_into
from mtt.wire.client_address import TrustedProxies

log = logging.getLogger("mtt.server")

SMUX_ON = "smux_on"
SMUX_OFF = "smux_off"
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


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


def choose_subprotocol(header: str | None, default_mux: bool) -> tuple[bool, str | None]:
    """(mux?, sub-protocol to echo), preferring smux_on like gorilla's Upgrader."""
    if header:
        offered = {item.strip() for item in header.split(",")}
        if SMUX_ON in offered:
            return True, SMUX_ON
        if SMUX_OFF in offered:
            return False, SMUX_OFF
    return default_mux, None


class _NoTcpOptionsSocket:
    """A socket view that ignores TCP-level options, which a Unix socket lacks."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if level != socket.IPPROTO_TCP:
            self._sock.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int) -> int:
        return 0 if level == socket.IPPROTO_TCP else int(self._sock.getsockopt(level, option))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _UnixTransport:
    """Delegates to a Unix-socket transport; picows sets TCP_NODELAY on every
    socket it is handed, which a Unix socket refuses."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        value = self._transport.get_extra_info(name, default)
        if name == "socket" and value is not None:
            return _NoTcpOptionsSocket(value)
        if name == "peername" and not value:
            return "unix"
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _UnixWSProtocol(WSProtocol):  # type: ignore[misc]
    def connection_made(self, transport: Any) -> None:
        super().connection_made(_UnixTransport(transport))


class TunnelServer:
    """Accepts connections, upgrades them and starts a tunnel per WebSocket."""

    def __init__(
        self,
        agent: Agent,
        limits: Limits,
        *,
        default_mux: bool,
        ssl_context: ssl.SSLContext | None,
        fallback: Fallback | None = None,
        trusted: TrustedProxies | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        self.agent = agent
        self.table = agent.table
        agent.gauges = self.gauges
        self.trusted = trusted
        self.proxy_protocol = proxy_protocol
        self.limits = limits
        self.default_mux = default_mux
        self.ssl_context = ssl_context
        self.fallback = fallback
        self.registry: TunnelRegistry = TunnelRegistry()
        self._server: asyncio.Server | None = None
        self.unix = False
        self._ws_logger = logging.getLogger("mtt.ws")

    def _protocol_factory(self, front: FrontProtocol, admitted: bool) -> WSProtocol:
        """The WebSocket layer for a connection whose request head the front
        layer accepted (and, for users with server-wide limits, admitted)."""
        limits = self.limits
        peer = front.peer  # the client's, as the front layer settled it
        client_ip = front.client_ip

        def route(request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
            return self._route(request, peer, client_ip, admitted)

        protocol_class = _UnixWSProtocol if self.unix else WSProtocol
        return protocol_class(
            host_port=None,
            ws_path=None,
            is_client_side=False,
            ws_listener_factory=route,
            logger=self._ws_logger,
            disconnect_on_exception=True,
            websocket_handshake_timeout=limits.handshake_timeout,
            enable_auto_ping=False,
            auto_ping_idle_timeout=20,
            auto_ping_reply_timeout=20,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            enable_auto_pong=False,  # CheckedListener answers pings, with back-pressure
            max_frame_size=limits.max_ws_frame,
            extra_headers=None,
            read_buffer_init_size=16 * 1024,  # grows when needed; memory per idle tunnel
        )

    def _route(
        self, request: WSUpgradeRequest, peer: str, client_ip: str, admitted: bool
    ) -> WSUpgradeResponseWithListener:
        key = routing_key(request.path)
        user = self.table.lookup(key) if key is not None else None
        if user is None:  # deleted since the front layer looked
            log.info("%s: user %s deleted during the upgrade", peer, key)
            if admitted and key is not None:
                self.agent.abandon(key, client_ip)
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(
                    404, PAGES[404][1], {"Server": "nginx", "Content-Type": "text/html"}
                ),
                None,
            )
        assert key is not None
        mux, subprotocol = choose_subprotocol(
            request.headers.get("Sec-WebSocket-Protocol"), self.default_mux
        )
        account = TunnelAccount(self.agent, key, user, client_ip, admitted)
        listener: WSListener
        if mux:
            listener = MuxTunnel(account, peer, self.limits, self.registry)
        else:
            listener = PlainTunnel(account, peer, self.limits, self.registry)
        headers = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None
        log.debug("%s %s: upgrade (%s) to %s", peer, key, "smux" if mux else "plain", user.dst)
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response(headers), listener
        )

    def gauges(self) -> dict[str, int]:
        """Open tunnels by mode and smux streams, for metrics."""
        plain = smux = streams = 0
        for tunnel in self.registry.active:
            if isinstance(tunnel, MuxTunnel):
                smux += 1
                streams += len(tunnel.streams)
            else:
                plain += 1
        return {"plain": plain, "smux": smux, "stream": streams}

    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound, listening socket."""
        loop = asyncio.get_running_loop()
        self.unix = sock.family == socket.AF_UNIX

        def front(client: tuple[str, int] | None = None) -> FrontProtocol:
            return FrontProtocol(
                self.agent,
                routing_key,
                self._protocol_factory,
                self.limits,
                self.fallback,
                trusted=self.trusted,
                client=client,
            )

        timeout = self.limits.handshake_timeout
        ssl_context = self.ssl_context
        factory: Callable[[], asyncio.Protocol]
        if self.proxy_protocol:  # the PROXY header comes first, then TLS (prelude.py)
            factory = lambda: ProxyPrelude(front, ssl_context, timeout, self.trusted)  # noqa: E731
        elif ssl_context is not None:  # TLS or plain HTTP, told apart as nginx does
            factory = lambda: FirstBytes(front(), ssl_context, timeout)  # noqa: E731
        else:
            factory = front
        # aiofastnet (by picows' author) runs TLS in C with fewer copies than
        # asyncio's or uvloop's SSL transports: the tunnel data plane's biggest cost.
        self._server = await aiofastnet.create_server(
            loop, factory, sock=sock, backlog=self.limits.listen_backlog
        )

    def close(self) -> None:
        """Stop accepting and close every established tunnel now."""
        if self._server is not None:
            self._server.close()
        for tunnel in list(self.registry.active):
            tunnel.shutdown()

    async def drain(self, grace: float) -> None:
        """Stop accepting; let established tunnels finish for up to `grace` seconds."""
        if self._server is not None:
            self._server.close()
        if self.registry.active:
            log.info("waiting up to %.0f s for %d tunnels", grace, len(self.registry.active))
            try:
                async with asyncio.timeout(grace):
                    await self.registry.wait_idle()
            except TimeoutError:
                log.info("closing %d tunnels still open", len(self.registry.active))
        self.close()
        # Let the close frames reach the transports before the loop stops.
        await asyncio.sleep(0.1)

    def reload_tls(self, spec: TlsSpec) -> None:
        """New handshakes use the new certificate; established tunnels keep theirs."""
        if self.ssl_context is None:
            return
        load_pem_into(
            self.ssl_context,
            spec["cert_pem"].encode("latin-1"),
            spec["key_pem"].encode("latin-1"),
            spec["origin"],
        )
