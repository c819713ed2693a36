"""The -acme-http listener: ACME's HTTP-01 challenge (RFC 8555 §8.3) on port 80.

It runs in the supervisor, the one process that orders, so its answers need
no message to anyone. It serves GET /.well-known/acme-challenge/TOKEN for
pending tokens and nginx's 404 for everything else (wire/acme.py), one
request per connection. Port 80 faces the whole internet: the head is
bounded in size (acme_http_max_head) and time (acme_http_timeout), and past
acme_http_max_connections a new connection is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from email.utils import formatdate

from mtt.accept.front import format_peer, shut
from mtt.config import Limits
from mtt.wire.acme import http01_reply
from mtt.wire.nginx_pages import http_response

log = logging.getLogger("mtt.acme")


class Http01Listener:
    """Answers HTTP-01 for the tokens in `answers` (token -> key authorization)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.answers: dict[str, str] = {}
        self.open = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Http01Protocol(self), sock=sock)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


class _Http01Protocol(asyncio.Protocol):
    def __init__(self, listener: Http01Listener) -> None:
        self._listener = listener
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "?"
        self._counted = False
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = format_peer(str(peer[0]), int(peer[1]))
        listener = self._listener
        limits = listener.limits
        if listener.open >= limits.acme_http_max_connections:
            self._done = True
            shut(transport, abort=True)
            return
        listener.open += 1
        self._counted = True
        self._timer = asyncio.get_running_loop().call_later(
            limits.acme_http_timeout, self._on_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        limit = self._listener.limits.acme_http_max_head
        if end < 0 and len(self._buffer) < limit:
            return
        if end < 0:  # a head this long is no validation request
            head = bytes(self._buffer[:limit])
            status, reply = 400, http_response(400, formatdate(usegmt=True))
        else:
            head = bytes(self._buffer[:end])
            status, reply = http01_reply(head, self._listener.answers, formatdate(usegmt=True))
        self._answer(status, reply, head)

    def _answer(self, status: int, reply: bytes, head: bytes) -> None:
        self._done = True
        self._cancel_timer()
        line = head.split(b"\r\n", 1)[0][:200].decode("ascii", "replace")
        if status == 200:
            log.info("ACME: %s: answered HTTP-01 (%s)", self._peer, line)
        else:
            log.debug("ACME: %s: HTTP-01 listener answered %d to %r", self._peer, status, line)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(reply)
        shut(transport)

    def eof_received(self) -> bool:
        return False

    def _on_timeout(self) -> None:
        self._timer = None
        if not self._done:
            self._done = True
            log.debug("ACME: %s: no request on the HTTP-01 listener in time", self._peer)
            shut(self._transport, abort=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._cancel_timer()
        if self._counted:
            self._counted = False
            self._listener.open -= 1

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
