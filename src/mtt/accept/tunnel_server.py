"""The tunnel listener: TLS (or plain HTTP), the upgrade, and routing by path.

The route is resolved once, at upgrade time (docs/protocol.md §3): the tunnel keeps
its Destination, so a later change to the user table never touches it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import aiofastnet
from picows import (
    WSAutoPingStrategy,
    WSListener,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from mtt.accept.fallback import Fallback
from mtt.accept.first_bytes import FirstBytes
from mtt.accept.front import FrontProtocol
from mtt.accept.prelude import ProxyPrelude
from mtt.accept.tls_setup import TlsSpec
from mtt.config import Limits
from mtt.core.users import MuxProtocol
from mtt.service.agent import Agent, TunnelAccount
from mtt.transport.mux import MuxTunnel
from mtt.transport.plain import PlainTunnel, TunnelRegistry
from mtt.transport.tls import challenge_context, load_pem_into
from mtt.wire.client_address import TrustedProxies
from mtt.wire.nginx_pages import PAGES
from mtt.wire.origin import OriginPolicy
from mtt.wire.request_head import (  # noqa: F401 (choose_subprotocol, routing_key re-exported)
    Upgrade,
    choose_subprotocol,
    mode_for,
    routing_key,
)

log = logging.getLogger("mtt.server")


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
        default_mux: MuxProtocol,
        ssl_context: ssl.SSLContext | None,
        fallback: Fallback | None = None,
        trusted: TrustedProxies | None = None,
        proxy_protocol: bool = False,
        origins: OriginPolicy | None = None,
    ) -> None:
        self.agent = agent
        self.table = agent.table
        agent.gauges = self.gauges
        self.trusted = trusted
        self.origins = origins
        self.proxy_protocol = proxy_protocol
        self.limits = limits
        self.default_mux = default_mux
        self.ssl_context = ssl_context
        # Pending TLS-ALPN-01 challenges, changed in place: connections read it at accept.
        self.challenges: dict[str, ssl.SSLContext] = {}
        self.fallback = fallback
        self.registry: TunnelRegistry = TunnelRegistry()
        self._server: asyncio.Server | None = None
        self.unix = False
        # An adapter, not the Logger itself: handed a Logger, picows makes a child
        # Logger for every connection (about 10 us each); its lines lose only the fd.
        self._ws_logger = logging.LoggerAdapter(logging.getLogger("mtt.ws"))

    def _protocol_factory(
        self, front: FrontProtocol, upgrade: Upgrade, admitted: bool
    ) -> WSProtocol:
        """The WebSocket layer for a connection whose request head the front
        layer accepted as `upgrade` (and, for users with server-wide limits,
        admitted)."""
        limits = self.limits
        peer = front.peer  # the client's, as the front layer settled it
        client_ip = front.client_ip

        def route(request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
            return self._route(upgrade, peer, client_ip, admitted)

        protocol_class = _UnixWSProtocol if self.unix else WSProtocol
        return protocol_class(
            host_port=None,
            ws_path=None,
            is_client_side=False,
            ws_listener_factory=route,
            logger=self._ws_logger,
            disconnect_on_exception=True,
            websocket_handshake_timeout=limits.handshake_timeout,
            enable_auto_ping=False,  # the server never pings, as the Go server
            auto_ping_idle_timeout=None,  # (unused with auto-ping off)
            auto_ping_reply_timeout=None,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            enable_auto_pong=False,  # CheckedListener answers pings, with back-pressure
            max_frame_size=limits.max_ws_frame,
            extra_headers=None,
            read_buffer_init_size=limits.ws_read_buffer,
        )

    def _route(
        self, upgrade: Upgrade, peer: str, client_ip: str, admitted: bool
    ) -> WSUpgradeResponseWithListener:
        """The 101 with the tunnel the front layer's verdict chose, unless the
        user was deleted while being admitted."""
        key, subprotocol = upgrade.key, upgrade.subprotocol
        user = self.table.lookup(key)
        if user is None:  # deleted since the front layer looked
            log.info("%s: user %s deleted during the upgrade", peer, key)
            if admitted:
                self.agent.abandon(key, client_ip)
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(
                    404, PAGES[404][1], {"Server": "nginx", "Content-Type": "text/html"}
                ),
                None,
            )
        mode = mode_for(upgrade.mode, user.mux, self.default_mux)
        account = TunnelAccount(self.agent, key, user, client_ip, admitted)
        listener: WSListener
        if mode is MuxProtocol.NONE:
            listener = PlainTunnel(
                account, peer, self.limits, self.registry, early_data=upgrade.early_data
            )
        else:
            listener = MuxTunnel(account, peer, self.limits, self.registry, mode)
        # The chosen sub-protocol, or the early-data header as sent, as Xray's server echoes it.
        headers = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None
        early = f", {len(upgrade.early_data)} bytes of early data" if upgrade.early_data else ""
        shown = "plain" if mode is MuxProtocol.NONE else mode.value
        log.debug("%s %s: upgrade (%s%s) to %s", peer, key, shown, early, user.dst)
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response(headers), listener
        )

    def gauges(self) -> dict[str, int]:
        """Open tunnels by mode and their streams (smux and Mux.Cool), for metrics."""
        gauges = {"plain": 0, "smux": 0, "muxcool": 0, "stream": 0}
        for tunnel in self.registry.active:
            if isinstance(tunnel, MuxTunnel):
                gauges[tunnel.kind] += 1
                gauges["stream"] += len(tunnel.streams)
            else:
                gauges["plain"] += 1
        return gauges

    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound, listening socket."""
        loop = asyncio.get_running_loop()
        self.unix = sock.family == socket.AF_UNIX

        def front(client: tuple[str, int] | None = None) -> FrontProtocol:
            return FrontProtocol(
                self.agent,
                self._protocol_factory,
                self.limits,
                self.fallback,
                trusted=self.trusted,
                client=client,
                origins=self.origins,
            )

        ssl_context = self.ssl_context
        challenges = self.challenges
        factory: Callable[[], asyncio.Protocol]
        if self.proxy_protocol:  # the PROXY header comes first, then TLS (prelude.py)
            factory = lambda: ProxyPrelude(  # noqa: E731
                front, ssl_context, self.limits, self.trusted, challenges
            )
        elif ssl_context is not None:  # TLS or plain HTTP, told apart as nginx does
            factory = lambda: FirstBytes(front(), ssl_context, self.limits, None, challenges)  # noqa: E731
        else:
            factory = front
        # aiofastnet (by picows' author) runs TLS in C with fewer copies than
        # asyncio's or uvloop's SSL transports: the tunnel data plane's biggest cost.
        self._server = await aiofastnet.create_server(
            loop, factory, sock=sock, backlog=self.limits.listen_backlog
        )

    def serving(self) -> bool:
        """The listener accepts connections (for /readyz)."""
        return self._server is not None and self._server.is_serving()

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
        await asyncio.sleep(self.limits.shutdown_flush)

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

    def set_challenges(self, specs: dict[str, TlsSpec]) -> None:
        """Serve these TLS-ALPN-01 challenge certificates (domain -> PEM), and no
        others: an empty dict ends every challenge. All or nothing: a spec that
        does not load leaves the pending ones as they were."""
        contexts = {
            domain: challenge_context(
                spec["cert_pem"].encode("latin-1"), spec["key_pem"].encode("latin-1"), domain
            )
            for domain, spec in specs.items()
        }
        self.challenges.clear()
        self.challenges.update(contexts)
