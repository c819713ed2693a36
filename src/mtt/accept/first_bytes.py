"""The first bytes of a connection to the TLS listener: TLS or plain HTTP?

nginx decides on the first byte (ngx_http_ssl_handshake): 0x16 (a TLS
handshake record) or one with the top bit set (an SSLv2-style hello) starts
TLS; anything else is a plain HTTP request sent to the HTTPS port, answered
with nginx's 400 page for that. This listener decides the same way, with
classify(); FrontProtocol answers the plain HTTP (front.py).

For TLS the whole ClientHello is read here first (client_hello_complete(),
bounded), then aiofastnet's TLS layer is made over this very transport and
fed those bytes, as prelude.py does after a PROXY header: nothing is lost
whatever the segmentation, and a connection that sends nothing costs this
small protocol only, never TLS buffers. The deadline is the handshake
timeout from accept to the end of the handshake, both steps together.

OpenSSL answers a ClientHello it refuses (SSLv3, no shared cipher, an ALPN
it cannot serve, garbage in a handshake record) with an alert, and garbage
sent along with a good ClientHello with its flight and then an alert;
aiofastnet closes the connection without sending what OpenSSL wrote, nginx
sends it. So when the handshake fails, the bytes of the first read are
replayed through the stdlib's ssl with the same context, and what OpenSSL
writes there (the same records: same library, same settings, same input;
fresh randoms in a flight) is sent before the close. A failure that comes
later, after the server's flight went out, is closed without its alert.

Which context the handshake gets is decided here too, from the ClientHello
read: while an ACME order waits for its TLS-ALPN-01 validation (RFC 8737),
a ClientHello offering ALPN acme-tls/1 for a name with a pending challenge
gets that name's challenge context, every other one the real certificate.
OpenSSL runs the servername callback before it selects ALPN, so no callback
could make this choice during the handshake; with no challenge pending the
ClientHello is not parsed at all (wire/client_hello.py does the parsing).

Connections handed here: -proxy-protocol ones after their header
(prelude.py) and every one of a TLS listener (tunnel_server.py); a listener
without TLS never uses this.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from collections.abc import Mapping
from typing import Any

from aiofastnet.constants import SSL_BIO_SIZE_DEFAULTS, SSL_TIMEOUT_DEFAULTS
from aiofastnet.ssl_transport import SSLTransport_Transport  # type: ignore[import-not-found]

from mtt.accept.front import FrontProtocol, format_peer, shut
from mtt.config import Limits
from mtt.wire.acme import offers_acme_alpn
from mtt.wire.client_hello import hello_names

log = logging.getLogger("mtt.server")

# Pending TLS-ALPN-01 challenges: domain -> the context serving its challenge certificate.
Challenges = Mapping[str, ssl.SSLContext]

_MAX_RECORD = 16 * 1024 + 2048  # TLSCiphertext's bound; a larger length is refused
_MIN_SSL2_RECORD = 9  # OpenSSL's MIN_SSL2_RECORD_LEN
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01


class Start(enum.Enum):
    TLS = "tls"
    PLAIN = "plain"


def classify(first_byte: int) -> Start:
    """nginx's test: a TLS (0x16) or SSLv2-style (top bit) record starts TLS."""
    return Start.TLS if first_byte == _HANDSHAKE or first_byte & 0x80 else Start.PLAIN


class ClientHelloReader:
    """Tells when a connection's first bytes hold the whole first handshake
    message, or enough to show that OpenSSL will not wait for one (then it
    may decide now). Like OpenSSL's record layer it reads a 5-byte header
    first. Each call resumes after the records already whole, so bytes
    dribbled one by one cost each byte once. Past max_hello bytes it stops
    waiting: the TLS layer reads the rest itself."""

    def __init__(self, max_hello: int) -> None:
        self._max_hello = max_hello
        self._next = 0  # offset of the first record not yet whole
        self._payload = 0  # handshake bytes in the whole records before it
        self._header = b""  # the handshake message's first 4 bytes, as far as seen

    def complete(self, data: bytes | bytearray) -> bool:
        """data: every byte so far (it only grows between calls)."""
        size = len(data)
        if size < 5:
            return False
        if size >= self._max_hello:
            return True
        if data[0] & 0x80 and data[2] == _CLIENT_HELLO:  # an SSLv2-style ClientHello
            length = ((data[0] & 0x7F) << 8) | data[1]
            return not _MIN_SSL2_RECORD <= length <= _MAX_RECORD or size >= 2 + length
        while size >= self._next + 5:
            at = self._next
            length = int.from_bytes(data[at + 3 : at + 5], "big")
            if data[at : at + 2] != b"\x16\x03" or not 0 < length <= _MAX_RECORD:
                return True  # no TLS handshake record: OpenSSL refuses it from the header
            end = at + 5 + length
            got = min(end, size) - (at + 5)
            header = self._header
            if len(header) < 4:
                header += bytes(data[at + 5 : at + 5 + min(got, 4 - len(header))])
            if len(header) == 4:
                if header[0] != _CLIENT_HELLO:
                    return True
                if self._payload + got >= 4 + int.from_bytes(header[1:4], "big"):
                    return True
            if end > size:
                return False  # this record is still coming
            self._header, self._payload, self._next = header, self._payload + got, end
        return False


def client_hello_complete(data: bytes | bytearray, max_hello: int) -> bool:
    """ClientHelloReader's verdict on data read at once."""
    return ClientHelloReader(max_hello).complete(data)


def refusal_reply(ctx: ssl.SSLContext, received: bytes) -> tuple[bytes, str]:
    """(What OpenSSL writes before it gives up on a handshake that starts with
    `received`, why it gives up): the bytes replayed through memory BIOs.
    (b"", "") when they are no reason to give up (it would wait for more)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    replay = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(received)
    try:
        replay.do_handshake()
    except ssl.SSLWantReadError:
        return b"", ""
    except ssl.SSLError as exc:
        return outgoing.read(), exc.reason or str(exc)
    return b"", ""


def challenge_domain(hello: bytes, challenges: Challenges, max_hello: int) -> str | None:
    """The domain whose TLS-ALPN-01 challenge this ClientHello (of at most
    max_hello bytes) asks for, if any: it offers ALPN acme-tls/1 and names, by
    SNI, a domain with a pending challenge."""
    if not challenges:
        return None
    names = hello_names(hello, max_hello)
    if names is None or names.server_name is None or not offers_acme_alpn(names.alpn):
        return None
    return names.server_name if names.server_name in challenges else None


class _AlertingTLS(SSLTransport_Transport):  # type: ignore[misc]
    """aiofastnet's TLS layer over a transport; on a failed handshake it first
    sends the alert OpenSSL wrote for the ClientHello (see the module's doc)."""

    __slots__ = ("_ctx", "_hello", "_peer", "_raw")
    logs_own_failures = True  # the loop's exception handler need not (logs.py)
    _ctx: ssl.SSLContext
    _hello: bytes | None
    _peer: str
    _raw: asyncio.Transport

    def _force_close(self, exc: BaseException | None) -> None:
        hello = self._hello
        self._hello = None
        if hello is not None and self.get_extra_info("cipher") is None:  # still handshaking
            self._refused(exc, hello)
        super()._force_close(exc)

    def _refused(self, exc: BaseException | type[BaseException] | None, hello: bytes) -> None:
        if isinstance(exc, ssl.SSLError):
            # The first read decided it (else OpenSSL would have asked for more,
            # and the TLS layer have sent its flight): the same input, the same end.
            reply, reason = refusal_reply(self._ctx, hello)
            if reply and not self._raw.is_closing():
                self._raw.write(reply)
            log.info("%s: TLS handshake failed: %s", self._peer, reason or exc)
        elif isinstance(exc, ConnectionAbortedError):  # aiofastnet's handshake timeout
            log.info("%s: TLS handshake not done in time", self._peer)
        elif exc is not None:
            log.info("%s: closed during the TLS handshake", self._peer)

    def handshake_over(self, done: asyncio.Future[None]) -> None:
        """The hello is no longer needed once the handshake succeeded."""
        if not done.cancelled() and done.exception() is None:
            self._hello = None


class FirstBytes(asyncio.Protocol):
    """The first protocol of a connection on a TLS listener; replaces itself
    with the TLS layer (under `front`) or with `front` answering plain HTTP."""

    def __init__(
        self,
        front: FrontProtocol,
        ssl_context: ssl.SSLContext,
        limits: Limits,
        client: tuple[str, int] | None = None,
        challenges: Challenges | None = None,
    ) -> None:
        self._front = front
        self._challenges = challenges
        self._client = client  # named by a PROXY header: the peer for log lines
        self._ssl_context = ssl_context
        self._handshake_timeout = limits.handshake_timeout
        self._buffer = bytearray()
        self._max_hello = limits.max_client_hello
        self._hello = ClientHelloReader(limits.max_client_hello)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._peer = "unix"
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = self._client or transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = format_peer(str(peer[0]), int(peer[1]))
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._handshake_timeout
        self._timer = loop.call_at(self._deadline, self._on_timeout)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        if classify(self._buffer[0]) is Start.PLAIN:
            self._to_plain_http()
        elif self._hello.complete(self._buffer):
            self._to_tls()

    def eof_received(self) -> bool:
        if not self._done:
            self._give_up("closed before a TLS ClientHello", abort=False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._cancel_timer()

    def _on_timeout(self) -> None:
        if not self._done:
            self._give_up(f"no TLS ClientHello within {self._handshake_timeout:.0f} s")

    def _give_up(self, reason: str, abort: bool = True) -> None:
        log.info("%s: %s", self._peer, reason)
        self._done = True
        self._cancel_timer()
        shut(self._transport, abort)

    def _to_plain_http(self) -> None:
        """A plain request on the TLS port: FrontProtocol answers it as nginx."""
        self._done = True
        self._cancel_timer()
        transport = self._transport
        assert transport is not None
        front = self._front
        front.plain_http_on_tls_port()
        transport.set_protocol(front)
        front.connection_made(transport)
        if not transport.is_closing():
            front.data_received(bytes(self._buffer))
        self._buffer = bytearray()

    def _to_tls(self) -> None:
        """What aiofastnet.start_tls does, minus its await and with the bytes
        already read: a coroutine per connection would buy nothing."""
        self._done = True
        self._cancel_timer()
        transport = self._transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        hello = bytes(self._buffer)
        self._buffer = bytearray()
        context = self._ssl_context
        if self._challenges:
            domain = challenge_domain(hello, self._challenges, self._max_hello)
            if domain is not None:
                log.info("%s: TLS-ALPN-01 validation handshake for %s", self._peer, domain)
                context = self._challenges[domain]
        handshake = loop.create_future()
        tls = _AlertingTLS(
            loop,
            self._front,
            context,
            True,  # server side
            max(self._deadline - loop.time(), 0.001),  # what is left of the handshake timeout
            SSL_TIMEOUT_DEFAULTS["ssl_shutdown_timeout"],
            SSL_BIO_SIZE_DEFAULTS["ssl_incoming_bio_size"],
            SSL_BIO_SIZE_DEFAULTS["ssl_outgoing_bio_size"],
            waiter=handshake,
        )
        tls._raw = transport
        tls._hello = hello
        tls._peer = self._peer
        tls._ctx = context
        handshake.add_done_callback(tls.handshake_over)
        layer = tls.get_tls_protocol()
        transport.set_protocol(layer)
        layer.connection_made(transport)
        if not transport.is_closing():
            feed(layer, hello)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def feed(protocol: Any, data: bytes) -> None:
    """Deliver bytes already read to a protocol, buffered or not (aiofastnet's
    TLS protocols are Cython classes: not all derive from asyncio's)."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            n = min(len(buffer), len(view))
            if n == 0:
                return
            buffer[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)
