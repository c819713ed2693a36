"""-proxy-protocol: read the PROXY header a load balancer sends first, then
start TLS (or plain HTTP) on the same connection with FrontProtocol on top.

The header comes before the TLS handshake, so this listener is a plain TCP
one; once the header is complete the connection's protocol is swapped for
FirstBytes (first_bytes.py), which tells a ClientHello from plain HTTP as it
does without the header, and then for aiofastnet's TLS layer (server side,
over this very transport), which drives the handshake and then calls
FrontProtocol.connection_made. Bytes that came in the same read as the
header (a ClientHello sent right behind it) are fed to the next layer first,
so nothing is lost whatever the segmentation.

Every connection must start with a valid header, within the handshake
timeout; any other start is one log line with the peer and the reason, and a
close. With -trusted-proxy too, the header is required from every peer but
its address is believed only from a trusted one (as nginx does with
set_real_ip_from): anyone else could name any client.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from mtt.accept.first_bytes import Challenges, FirstBytes, feed
from mtt.accept.front import FrontProtocol, format_peer, shut
from mtt.config import Limits
from mtt.core.stats import STATS
from mtt.errors import ProtocolError
from mtt.wire.client_address import TrustedProxies
from mtt.wire.proxy_header import ProxyHeader, ProxyHeaderReader

log = logging.getLogger("mtt.server")

MakeFront = Callable[[tuple[str, int]], FrontProtocol]


class ProxyPrelude(asyncio.Protocol):
    """The first protocol of a -proxy-protocol connection; replaces itself."""

    def __init__(
        self,
        make_front: MakeFront,
        ssl_context: ssl.SSLContext | None,
        limits: Limits,
        trusted: TrustedProxies | None,
        challenges: Challenges | None = None,
    ) -> None:
        self._make_front = make_front
        self._challenges = challenges
        self._ssl_context = ssl_context
        self._limits = limits
        self._handshake_timeout = limits.handshake_timeout
        self._trusted = trusted if trusted else None
        self._reader = ProxyHeaderReader(max_v2_header=limits.max_proxy_v2_header)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._peer: tuple[str, int] = ("", 0)
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = (str(peer[0]), int(peer[1]))
        self._timer = asyncio.get_running_loop().call_later(
            self._handshake_timeout, self._on_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        try:
            header = self._reader.feed(data)
        except ProtocolError as exc:
            self._refuse(f"bad PROXY protocol header: {exc}")
            return
        if isinstance(header, ProxyHeader):
            self._hand_over(header)

    def eof_received(self) -> bool:
        if not self._done:
            self._refuse("closed before sending a PROXY protocol header", abort=False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._cancel_timer()

    def _on_timeout(self) -> None:
        if not self._done:
            self._refuse(f"no PROXY protocol header within {self._handshake_timeout:.0f} s")

    def _client(self, header: ProxyHeader) -> tuple[str, int]:
        if header.source is None:
            return self._peer
        if self._trusted is not None and not self._trusted.contains(self._peer[0]):
            log.info(
                "%s: PROXY header naming %s ignored: peer is not a trusted proxy",
                format_peer(*self._peer),
                format_peer(*header.source),
            )
            return self._peer
        return header.source

    def _hand_over(self, header: ProxyHeader) -> None:
        self._done = True
        self._cancel_timer()
        transport = self._transport
        assert transport is not None
        client = self._client(header)
        front = self._make_front(client)
        rest = self._reader.remainder
        next_layer: asyncio.Protocol
        if self._ssl_context is None:
            next_layer = front
        else:  # TLS or plain HTTP to the TLS port, decided as without the header
            next_layer = FirstBytes(
                front, self._ssl_context, self._limits, client, self._challenges
            )
        transport.set_protocol(next_layer)
        next_layer.connection_made(transport)
        if rest and not transport.is_closing():
            feed(next_layer, rest)

    def _refuse(self, reason: str, abort: bool = True) -> None:
        log.warning("%s: %s", format_peer(*self._peer), reason)
        STATS.handshake_failed("proxy_header")
        self._done = True
        self._cancel_timer()
        shut(self._transport, abort)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
