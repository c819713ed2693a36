"""The first bytes of every connection: read one HTTP request head, then either
hand the connection to the WebSocket layer (a valid upgrade on a user's path)
or answer like an ordinary web server.

To anyone without a valid user path the server must be indistinguishable from
a plain web server: a GET of a user's path, a GET of an unknown path, an
upgrade on an unknown path and any other method all get the same 404 page;
malformed requests get nginx's 400. The request head is parsed by h11 with a
size cap, under the handshake deadline. Plain HTTP sent to the TLS listener
(first_bytes.py) gets what nginx sends there: its "plain HTTP request was
sent to HTTPS port" 400, or a 400 as soon as the request line goes wrong.
What to answer is decided by the sans-I/O mtt.wire.request_head (and the
pages are mtt.wire.nginx_pages'); this module moves the bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from email.utils import formatdate
from typing import Any

import h11

from mtt.accept.fallback import Fallback, FallbackRelay
from mtt.address import format_hostport
from mtt.config import Limits
from mtt.core.stats import STATS
from mtt.service.agent import Agent
from mtt.transport.tasks import spawn
from mtt.wire import request_head
from mtt.wire.client_address import TrustedProxies
from mtt.wire.nginx_pages import TO_HTTPS_PAGE, http09_page
from mtt.wire.nginx_pages import http_response as nginx_response
from mtt.wire.origin import OriginPolicy
from mtt.wire.quick_head import quick_head
from mtt.wire.request_head import (
    BadRequest,
    Forbidden,
    NotFound,
    PlainHttpOnTlsPort,
    RequestHead,
    ToFallback,
    Upgrade,
)
from mtt.wire.request_line import RequestLineReader, Verdict

log = logging.getLogger("mtt.server")


def http_response(
    status: int, head_only: bool = False, keep_alive: bool = False, body: bytes | None = None
) -> bytes:
    """nginx's response (nginx_pages.py), dated now."""
    return nginx_response(status, formatdate(usegmt=True), head_only, keep_alive, body)


def request_head_of(request: h11.Request) -> RequestHead:
    """h11's parse of a request head, as the sans-I/O verdict takes it: the
    headers copied once into a list, which the verdict walks several times
    (h11's Headers iterates through Sequence.__getitem__, item by item)."""
    headers = list(request.headers)
    return RequestHead(request.method, request.target, request.http_version, headers)


def shut(transport: asyncio.BaseTransport | None, abort: bool = False) -> None:
    """End a connection that has not become a tunnel: abort (a reset, for a
    peer that broke the rules) or close (after what was written), once."""
    if transport is not None and not transport.is_closing():
        if abort:
            transport.abort()  # type: ignore[attr-defined]
        else:
            transport.close()


def format_peer(ip: str, port: int | None) -> str:
    """The `peer` of log lines: ip:port, [v6]:port, just the ip when the port
    is unknown (X-Forwarded-For), "unix" for a Unix-socket peer."""
    if not ip:
        return "unix"
    if port is None:
        return ip
    return format_hostport(ip, port)


class FrontProtocol(asyncio.Protocol):
    """Reads the request head; hands tunnels over, answers everything else.

    client_ip is the client's address ("" for a Unix-socket peer): the
    connection's peer, or the one a PROXY protocol header named (`client`),
    or, for each request from a trusted proxy, the one its headers name.
    """

    def __init__(
        self,
        agent: Agent,
        make_ws_protocol: Callable[[FrontProtocol, Upgrade, bool], Any],
        limits: Limits,
        fallback: Fallback | None = None,
        *,
        trusted: TrustedProxies | None = None,
        client: tuple[str, int] | None = None,
        origins: OriginPolicy | None = None,
    ) -> None:
        self._agent = agent
        self._table = agent.table
        self._make_ws_protocol = make_ws_protocol
        self._handshake_timeout = limits.handshake_timeout
        self._limits = limits
        self._fallback = fallback
        self._raw = bytearray()  # what the client sent, replayed to a fallback site
        self._transport: asyncio.Transport | None = None
        self._h11: h11.Connection | None = None  # made when a request needs it (_http)
        self._timer: asyncio.TimerHandle | None = None
        self._done = False
        self._requests = 0
        self._trusted = trusted if trusted else None
        self._origins = origins if origins else None
        self._client = client  # the connection's client: (ip, port), ("", 0) for a Unix socket
        self.peer = "unix"
        self.client_ip = ""  # the real client's address: for limits and counters
        self._early: bytearray | None = None
        # Made at accept, before TLS: the handshake latency starts here, and a
        # protocol that never saw connection_made failed its TLS handshake.
        self._accepted = asyncio.get_running_loop().time()
        self._made = False
        self._on_tls_port = False  # plain HTTP that came to the TLS listener
        self._line: bytearray | None = None  # its request line, until nginx would accept it
        self._line_reader: RequestLineReader | None = None
        self._discarding = False  # answered; reading the rest of the request's body
        self._h11_fed = False  # h11 has seen bytes: no quick parse any more
        self._trailing: bytes | None = None  # after a quickly parsed head (h11 keeps its own)

    @property
    def _http(self) -> h11.Connection:
        """h11, made on first use: a tunnel's upgrade parsed by _quick never needs it."""
        if self._h11 is None:
            self._h11 = h11.Connection(
                h11.SERVER, max_incomplete_event_size=self._limits.max_request_head
            )
        return self._h11

    def plain_http_on_tls_port(self) -> None:
        """This connection sent plain HTTP to the TLS listener (first_bytes.py):
        answer as nginx does there, never with a tunnel or a user's 404."""
        self._on_tls_port = True
        self._line = bytearray()
        # A request line is part of the head: no longer than the head may be.
        self._line_reader = RequestLineReader(max_line=self._limits.max_request_head)

    def __del__(self) -> None:
        if not self._made:
            STATS.handshake_failed("tls")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._made = True
        if self._client is None:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and len(peer) >= 2:
                self._client = (str(peer[0]), int(peer[1]))
            else:
                self._client = ("", 0)
        self.client_ip = self._client[0]
        self.peer = format_peer(*self._client)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._handshake_timeout, self._on_timeout)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._discard_body(data)
            return
        if self._early is not None:  # admission pending: keep what the client sends early
            self._early += data
            if len(self._early) > self._limits.dial_buffer:
                self._close(abort=True)
            return
        if self._done:
            return
        if self._line is not None:
            checked = self._check_plain_line(data)
            if checked is None:
                return
            data = checked
        if self._fallback is not None and self._requests == 0:
            self._raw += data
        if not self._h11_fed and self._quick(data):
            return
        self._h11_fed = True
        try:
            self._http.receive_data(data)
            self._process()
        except h11.RemoteProtocolError as exc:
            self._reject(400, f"bad request: {exc}")

    def _check_plain_line(self, data: bytes) -> bytes | None:
        """Plain HTTP on the TLS port: answer a request line as soon as nginx
        would; the bytes to parse on once it is a good HTTP/1 one, else None."""
        assert self._line is not None and self._line_reader is not None
        fallback = self._fallback
        if fallback is not None and fallback.tls:
            # The decoy's own TLS port answers plain HTTP best (and as itself).
            self._line = None
            self._raw += data
            self._to_fallback(Fallback(fallback.dst, tls=False))
            return None
        self._line += data
        verdict = self._line_reader.feed(data)
        if verdict.verdict is Verdict.NEED_MORE:
            return None
        if verdict.verdict is Verdict.INVALID:
            self._reject(400, "plain HTTP to the TLS port: bad request line")
        elif verdict.verdict is Verdict.VERSION:
            self._reject(505, "plain HTTP to the TLS port: HTTP version not supported")
        elif verdict.verdict is Verdict.HTTP09:
            # nginx answers HTTP/0.9 with the page alone; only GET exists there.
            page = http09_page(verdict.method)
            log.warning("%s: plain HTTP/0.9 request to the TLS port", self.peer)
            STATS.handshake_failed("bad_request")
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(page)
            self._close()
        else:
            rest = bytes(self._line[verdict.start :])  # nginx skips empty lines first
            self._line = None
            return rest
        return None

    def _process(self) -> None:
        """Handle every complete request buffered (keep-alive clients may pipeline)."""
        while not self._done:
            event = self._http.next_event()
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.EndOfMessage) and self._http.our_state is h11.DONE:
                self._next_request()
            elif isinstance(event, h11.Data):
                continue  # a body sent to a 404: read and dropped, as nginx does
            else:
                self._close()

    def eof_received(self) -> bool:
        if not self._done:
            log.info("%s: closed before sending a request", self.peer)
            STATS.handshake_failed("closed")
            self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._cancel_timer()

    def _on_timeout(self) -> None:
        if not self._done:
            log.info("%s: no complete request within %.0f s", self.peer, self._handshake_timeout)
            STATS.handshake_failed("timeout")
            self._close(abort=True)

    def _quick(self, data: bytes) -> bool:
        """A tunnel's upgrade, its head parsed without h11 (wire/quick_head.py);
        False leaves these bytes to h11, nothing changed."""
        if self._on_tls_port:
            return False
        parsed = quick_head(data, self._limits.max_request_head)
        if parsed is None:
            return False
        head, end = parsed
        client_ip, peer = self._client_of(head.headers)
        verdict = self._verdict(head, requests=1)
        if not isinstance(verdict, Upgrade):
            return False  # h11 parses it again, for the keep-alive bookkeeping of a 404
        self._requests = 1
        self.client_ip, self.peer = client_ip, peer
        self._trailing = data[end:]
        self._upgrade(verdict)
        return True

    def _client_of(self, headers: Sequence[tuple[bytes, bytes]]) -> tuple[str, str]:
        """(client_ip, peer) for a request with these headers: from a trusted
        proxy, the client its headers name."""
        if self._trusted is None or self._client is None:
            return self.client_ip, self.peer
        conn_ip = self._client[0]
        client_ip = self._trusted.real_client(
            conn_ip, headers, max_hops=self._limits.max_forwarded_hops
        )
        if client_ip == conn_ip:
            return client_ip, format_peer(*self._client)
        return client_ip, format_peer(client_ip, None)  # X-Forwarded-For names no port

    def _verdict(self, head: RequestHead, requests: int) -> request_head.Verdict:
        """The sans-I/O verdict on the connection's `requests`-th request head."""
        return request_head.verdict(
            head,
            route_exists=self._table.__contains__,
            max_head=self._limits.max_request_head,
            max_early_data=self._limits.max_early_data,
            keep_alive_allowed=requests < self._limits.max_keepalive_requests,
            fallback=self._fallback is not None,
            on_tls_port=self._on_tls_port,
            origins=self._origins,
        )

    def _on_request(self, request: h11.Request) -> None:
        self._requests += 1
        head = request_head_of(request)
        self.client_ip, self.peer = self._client_of(head.headers)
        verdict = self._verdict(head, self._requests)
        if isinstance(verdict, Upgrade):
            self._upgrade(verdict)
        elif isinstance(verdict, NotFound):
            self._not_found(verdict)
        elif isinstance(verdict, ToFallback):
            STATS.handshake_failed(verdict.failure)
            assert self._fallback is not None
            self._to_fallback(self._fallback)
        elif isinstance(verdict, BadRequest):
            self._reject(400, verdict.reason)
        elif isinstance(verdict, Forbidden):
            self._reject(403, verdict.reason, failure="refused")
        else:
            self._to_https_page(verdict)

    def _upgrade(self, upgrade: Upgrade) -> None:
        """Hand a valid upgrade over, after the user service's admission for a
        user with server-wide limits."""
        user = self._table.lookup(upgrade.key)
        assert user is not None  # the verdict just found it
        admission = self._agent.admission(upgrade.key, user, self.client_ip)
        if admission is None:
            self._hand_over(upgrade, admitted=False)
            return
        self._done = True
        self._early = bytearray()
        assert self._transport is not None
        self._transport.pause_reading()
        spawn(self._admit(upgrade, admission), name=f"admit {self.peer}")

    def _not_found(self, verdict: NotFound) -> None:
        STATS.handshake_failed(verdict.failure)
        log.warning("%s: %s", self.peer, verdict.reason)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(http_response(404, verdict.head_only, verdict.keep_alive))
        if not verdict.keep_alive:
            self._close()
            return
        # h11 must see our side of the exchange to allow the next request.
        self._http.send(h11.Response(status_code=404, headers=[("content-length", "0")]))
        self._http.send(h11.EndOfMessage())

    def _to_https_page(self, verdict: PlainHttpOnTlsPort) -> None:
        """nginx's answer to plain HTTP on its TLS port; a body announced and
        not yet sent is read and dropped for up to 5 s before the close."""
        log.warning("%s: plain HTTP request to the TLS port", self.peer)
        STATS.handshake_failed("bad_request")
        self._done = True
        self._cancel_timer()
        page = http_response(400, verdict.head_only, body=TO_HTTPS_PAGE)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(page)
        if self._http.their_state is not h11.SEND_BODY:
            self._close()
            return
        self._discarding = True
        self._timer = asyncio.get_running_loop().call_later(
            self._limits.lingering_timeout, self._close
        )
        self._discard_body(b"")

    def _discard_body(self, data: bytes) -> None:
        try:
            if data:  # h11 takes b"" for the end of the stream
                self._http.receive_data(data)
            while (event := self._http.next_event()) is not h11.NEED_DATA:
                if not isinstance(event, h11.Data):
                    self._close()
                    return
        except h11.RemoteProtocolError:
            self._close()

    def _next_request(self) -> None:
        self._http.start_next_cycle()
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(
            self._handshake_timeout, self._on_timeout
        )

    async def _admit(self, upgrade: Upgrade, admission: Awaitable[str | None]) -> None:
        """Ask the user service about server-wide limits, then open or refuse."""
        key = upgrade.key
        try:
            refused = await admission
        except ConnectionError:
            refused = "user service unreachable"
        self._cancel_timer()
        transport = self._transport
        if transport is None or transport.is_closing():
            if refused is None:
                self._agent.abandon(key, self.client_ip)
            return
        if refused is not None:
            log.warning("%s %s: refused: %s", self.peer, key, refused)
            STATS.handshake_failed("refused")
            transport.write(http_response(403))
            transport.close()
            return
        transport.resume_reading()
        self._hand_over(upgrade, admitted=True)

    def _hand_over(self, upgrade: Upgrade, admitted: bool) -> None:
        """Give the connection to the WebSocket layer, replaying the request."""
        self._done = True
        self._cancel_timer()
        transport = self._transport
        assert transport is not None
        if self._trailing is not None:
            trailing = self._trailing
        else:
            trailing = bytes(self._http.trailing_data[0])
        data = upgrade.head + trailing + (self._early or b"")
        self._early = None
        STATS.handshake_done(asyncio.get_running_loop().time() - self._accepted)
        ws_protocol = self._make_ws_protocol(self, upgrade, admitted)
        transport.set_protocol(ws_protocol)
        ws_protocol.connection_made(transport)
        view = memoryview(data)
        while view:
            buffer = ws_protocol.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            ws_protocol.buffer_updated(n)
            view = view[n:]

    def _to_fallback(self, fallback: Fallback) -> None:
        """Pipe this connection, from its first byte, to the decoy site."""
        self._done = True
        self._cancel_timer()
        assert self._transport is not None
        limits = self._limits
        FallbackRelay(
            self._transport,
            bytes(self._raw),
            fallback,
            peer=self.peer,
            connect_timeout=limits.connect_timeout,
            idle_timeout=limits.idle_timeout,
            high_water=limits.write_high_water,
        ).start()
        self._raw = bytearray()

    def _reject(self, status: int, reason: str, failure: str = "bad_request") -> None:
        log.warning("%s: %s", self.peer, reason)
        STATS.handshake_failed(failure)
        self._done = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(http_response(status))
        self._close()

    def _close(self, abort: bool = False) -> None:
        self._done = True
        self._discarding = False
        self._cancel_timer()
        shut(self._transport, abort)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
