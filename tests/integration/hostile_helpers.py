"""Raw-socket tools for the hostile-input tests (issue 6).

Nothing here trusts a WebSocket library: requests, frames and TCP misbehaviour
are written byte by byte, so a test sends exactly what an attacker would
(unmasked frames, lying lengths, half requests, a TLS handshake that stalls
halfway) and observes exactly what the server answers: status line, headers,
close code, and how long it took to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from tests.support import ServerProcess

SNI = "tunnel.test"
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample nonce: a valid 16-byte key
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@functools.cache
def client_tls() -> ssl.SSLContext:
    """A client context for the server's self-signed certificate (made once: loading
    the default CA store costs tens of milliseconds)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello record)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_tls().wrap_bio(incoming, outgoing, server_hostname=SNI)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- HTTP ----------------------------------------------------------------------


def upgrade_request(
    path: str,
    *,
    method: str = "GET",
    http: str = "HTTP/1.1",
    key: str | None = WS_KEY,
    version: str | None = "13",
    upgrade: str | None = "websocket",
    connection: str | None = "Upgrade",
    subprotocol: str | None = "smux_off",
    extra: str = "",
) -> bytes:
    """An RFC 6455 opening handshake, with any part left out or changed."""
    lines = [f"{method} {path} {http}", f"Host: {SNI}"]
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def plain_get(path: str) -> bytes:
    """What a browser or a scanner sends: no upgrade at all."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {SNI}\r\nUser-Agent: Mozilla/5.0\r\n"
        "Accept: */*\r\nConnection: keep-alive\r\n\r\n"
    ).encode()


@dataclass
class HttpReply:
    """One exchange: what came back, whether the server closed, and when (seconds
    until EOF, until the response was complete, or until the deadline)."""

    raw: bytes
    closed: bool  # EOF (or a reset) seen before the deadline
    elapsed: float  # seconds from sending to EOF, or to the deadline
    local_port: int
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def describe(self) -> str:
        what = (
            f"status {self.status}" if self.status is not None else f"no reply ({self.raw[:60]!r})"
        )
        end = "closed" if self.closed else "left open"
        end += f" after {self.elapsed:.2f} s"
        return f"{what}, {end}"


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


def parse_reply(raw: bytes, closed: bool, elapsed: float, port: int) -> HttpReply:
    reply = HttpReply(raw, closed, elapsed, port)
    head, sep, body = raw.partition(b"\r\n\r\n")
    match = _STATUS.match(head)
    if not sep or match is None:
        return reply
    reply.status = int(match.group(1))
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        reply.headers.append((name.strip(), value.strip()))
    reply.body = body
    return reply


async def connect(
    server: ServerProcess | int, tls: bool, limit_s: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the server's tunnel port (or to a loopback port)."""
    async with asyncio.timeout(limit_s):
        return await asyncio.open_connection(
            "127.0.0.1",
            server if isinstance(server, int) else server.port,
            ssl=client_tls() if tls else None,
            server_hostname=SNI if tls else None,
            limit=4 * MiB,
        )


def local_port(writer: asyncio.StreamWriter) -> int:
    return int(writer.get_extra_info("sockname")[1])


def response_complete(raw: bytes | bytearray) -> bool:
    """Whether raw holds a whole response: a 101 head, or a head and its Content-Length body."""
    head, sep, body = bytes(raw).partition(b"\r\n\r\n")
    match = _STATUS.match(head)
    if not sep or match is None:
        return False
    if match.group(1) == b"101":
        return True
    length = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    return length is not None and len(body) >= int(length.group(1))


async def read_until_eof(
    reader: asyncio.StreamReader,
    limit_s: float,
    cap: int = 4 * MiB,
    stop: Callable[[bytearray], bool] | None = None,
) -> tuple[bytes, bool]:
    """Everything until EOF (True), `stop(data)` or the deadline (False); a reset counts as EOF."""
    out = bytearray()
    try:
        async with asyncio.timeout(limit_s):
            while len(out) < cap:
                chunk = await reader.read(65536)
                if not chunk:
                    return bytes(out), True
                out += chunk
                if stop is not None and stop(out):
                    return bytes(out), False
    except TimeoutError:
        return bytes(out), False
    except (ConnectionError, ssl.SSLError, OSError):
        return bytes(out), True
    return bytes(out), False


async def send_and_read(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    data: bytes,
    *,
    limit_s: float,
    piece: int = 0,
    until_eof: bool = False,
) -> HttpReply:
    """Send data (in `piece`-byte writes if set), then read until a whole response
    has come (a keep-alive 404 leaves the connection open), EOF, or limit_s.

    A write the server cuts short (it already answered and closed) is not an error.
    """
    port = local_port(writer)
    started = time.monotonic()
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError, TimeoutError):
        async with asyncio.timeout(limit_s):
            step = piece or len(data) or 1
            for i in range(0, len(data), step):
                if writer.is_closing():
                    break
                writer.write(data[i : i + step])
                await writer.drain()
                if piece:
                    await asyncio.sleep(0.001)
    left = max(0.1, limit_s - (time.monotonic() - started))
    raw, closed = await read_until_eof(reader, left, stop=None if until_eof else response_complete)
    return parse_reply(raw, closed, time.monotonic() - started, port)


async def exchange(
    server: ServerProcess,
    data: bytes,
    *,
    tls: bool,
    limit_s: float = 5.0,
    piece: int = 0,
    until_eof: bool = False,
) -> HttpReply:
    """One request on a fresh connection to the tunnel port."""
    reader, writer = await connect(server, tls)
    try:
        return await send_and_read(
            reader, writer, data, limit_s=limit_s, piece=piece, until_eof=until_eof
        )
    finally:
        writer.transport.abort()


async def raw_tcp_exchange(
    host_port: str, data: bytes, *, limit_s: float = 5.0, shut_write_after: float | None = None
) -> HttpReply:
    """Bytes to a plain TCP address; optionally half-close (FIN) after a pause."""
    host, port = host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        started = time.monotonic()
        writer.write(data)
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        if shut_write_after is not None:
            await asyncio.sleep(shut_write_after)
            with contextlib.suppress(ConnectionError, OSError):
                writer.write_eof()
        raw, closed = await read_until_eof(reader, limit_s, stop=response_complete)
        return parse_reply(raw, closed, time.monotonic() - started, local_port(writer))
    finally:
        writer.transport.abort()


async def slow_tls_connect(
    server: ServerProcess, pause_s: float, connected: Callable[[], None] = lambda: None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ssl.SSLObject, ssl.MemoryBIO]:
    """A TLS handshake driven by hand that waits pause_s before its last flight
    (`connected` is called when that wait begins).

    Returns the raw TCP stream and the TLS object; encrypt with obj.write() and
    send the returned BIO's bytes.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_tls().wrap_bio(incoming, outgoing, server_hostname=SNI)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if flight := outgoing.read():
                        writer.write(flight)
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionError("server closed during the TLS handshake") from None
                    incoming.write(chunk)
        connected()
        await asyncio.sleep(pause_s)
        writer.write(outgoing.read())  # the client Finished: the server's handshake ends now
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer, obj, outgoing


# -- WebSocket frames ------------------------------------------------------------


def ws_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    announced: int | None = None,
) -> bytes:
    """A client frame; `announced` lies about the payload length in the header."""
    length = len(payload) if announced is None else announced
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
    mbit = 0x80 if mask else 0
    if length < 126:
        head = struct.pack("!BB", first, mbit | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, mbit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mbit | 127, length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


# RFC 6455 §7.4 as gorilla/websocket applies it: a peer may send 1000-1003,
# 1007-1013 and 3000-4999. The boundaries of each invalid range, and of each valid one.
INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000, 65535]
VALID_CLOSE_CODES = [1000, 1001, 1003, 1007, 1011, 1012, 1013, 3000, 4999]


def close_code_of(payload: bytes) -> int:
    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005


@dataclass
class Closing:
    """How a WebSocket ended: close code (None: no close frame), EOF seen, seconds."""

    code: int | None
    eof: bool
    elapsed: float

    def describe(self) -> str:
        frame = f"close {self.code}" if self.code is not None else "no close frame"
        return f"{frame}, {'EOF' if self.eof else 'no EOF'} after {self.elapsed:.2f} s"


class RawWebSocket:
    """A WebSocket whose frames the test writes by hand."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, subprotocol: str | None
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.subprotocol = subprotocol
        self.port = local_port(writer)

    @classmethod
    async def open(
        cls,
        server: ServerProcess | int,
        path: str,
        *,
        tls: bool,
        subprotocol: str | None = "smux_off",
    ) -> RawWebSocket:
        reader, writer = await connect(server, tls)
        try:
            writer.write(upgrade_request(path, subprotocol=subprotocol))
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
        except BaseException:
            writer.transport.abort()
            raise
        reply = parse_reply(head, False, 0.0, 0)
        if reply.status != 101:
            writer.transport.abort()
            raise AssertionError(f"upgrade of {path} answered {head!r}")
        return cls(reader, writer, reply.header("Sec-WebSocket-Protocol"))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_binary(self, payload: bytes) -> None:
        self.writer.write(ws_frame(OP_BINARY, payload))

    async def drain(self, limit_s: float = 10.0) -> None:
        async with asyncio.timeout(limit_s):
            await self.writer.drain()

    async def send_in_pieces(
        self, data: bytes, piece: int, pause_s: float, limit_s: float = 10.0
    ) -> None:
        """Write `piece` bytes at a time, draining and pausing between them; a write
        the server cuts short (it already closed) just ends the sending."""
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError, TimeoutError):
            async with asyncio.timeout(limit_s):
                for i in range(0, len(data), piece):
                    if self.writer.is_closing():
                        return
                    self.writer.write(data[i : i + piece])
                    await self.writer.drain()
                    await asyncio.sleep(pause_s)

    async def read_frame(self, limit_s: float = 10.0) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next server frame, None at EOF; TimeoutError past limit_s."""
        try:
            async with asyncio.timeout(limit_s):
                head = await self.reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await self.reader.readexactly(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
                assert not head[1] & 0x80, "server frames must not be masked"
                assert length <= 64 * MiB, f"server announced a {length}-byte frame"
                return head[0] & 0x0F, await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return None

    async def read_data(self, size: int, limit_s: float = 10.0) -> bytes:
        """`size` bytes of message data (fewer if the server closed first)."""
        out = bytearray()
        async with asyncio.timeout(limit_s):
            while len(out) < size:
                frame = await self.read_frame(limit_s)
                if frame is None or frame[0] == OP_CLOSE:
                    break
                if frame[0] in (OP_BINARY, OP_TEXT, OP_CONT):
                    out += frame[1]
        return bytes(out)

    async def wait_closed(self, limit_s: float = 10.0) -> Closing:
        """Read (and drop) frames until the server's close frame and EOF, or limit_s."""
        started = time.monotonic()
        code: int | None = None
        deadline = started + limit_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = await self.read_frame(left)
            except TimeoutError:
                break
            if frame is None:
                return Closing(code, True, time.monotonic() - started)
            if frame[0] == OP_CLOSE and code is None:
                code = close_code_of(frame[1])
        return Closing(code, False, time.monotonic() - started)

    def abort(self) -> None:
        self.writer.transport.abort()


# -- dst servers ---------------------------------------------------------------


@dataclass
class DstConn:
    """One connection a dst server accepted."""

    opened_at: float
    received: bytearray = field(default_factory=bytearray)
    received_total: int = 0
    sent: int = 0
    closed_at: float | None = None


Behaviour = Callable[["Dst", asyncio.StreamReader, asyncio.StreamWriter, DstConn], Awaitable[None]]


class Dst:
    """A loopback dst: runs `behaviour` per connection, counting connections
    (total, open now, most open at once) and cleaning every one up on exit."""

    def __init__(self, behaviour: Behaviour, keep: int) -> None:
        self.behaviour = behaviour
        self.keep = keep
        self.conns: list[DstConn] = []
        self.open = 0
        self.max_open = 0
        self.changed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Future[object]] = set()

    @property
    def total(self) -> int:
        return len(self.conns)

    @property
    def addr(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = DstConn(time.monotonic())
        self.conns.append(conn)
        self._writers.add(writer)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        self.changed.set()
        try:
            await self.behaviour(self, reader, writer, conn)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            conn.closed_at = time.monotonic()
            self.open -= 1
            self._writers.discard(writer)
            writer.transport.abort()
            self.changed.set()
            if task is not None:
                self._tasks.discard(task)

    def keep_data(self, conn: DstConn, chunk: bytes) -> None:
        conn.received_total += len(chunk)
        if len(conn.received) < self.keep:
            conn.received += chunk[: self.keep - len(conn.received)]
        self.changed.set()

    async def wait_for(self, predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
        async with asyncio.timeout(limit_s):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)

    async def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)


async def collect(
    dst: Dst, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: DstConn
) -> None:
    """Read and keep everything until EOF."""
    while chunk := await reader.read(65536):
        dst.keep_data(conn, chunk)


async def echo(
    dst: Dst, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: DstConn
) -> None:
    while chunk := await reader.read(65536):
        dst.keep_data(conn, chunk)
        writer.write(chunk)
        await writer.drain()
        conn.sent += len(chunk)


def pusher(total: int, seconds: float) -> Behaviour:
    """Write as fast as the server takes it, until `total` bytes or `seconds` pass."""

    async def push(
        dst: Dst, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: DstConn
    ) -> None:
        chunk = os.urandom(256 * KiB)
        deadline = time.monotonic() + seconds
        while conn.sent < total and (left := deadline - time.monotonic()) > 0:
            writer.write(chunk)
            try:
                async with asyncio.timeout(left):
                    await writer.drain()
            except TimeoutError:
                break
            conn.sent += len(chunk)
        writer.transport.abort()

    return push


def slow_reader(rate: int) -> Behaviour:
    """Read at about `rate` bytes per second."""

    async def read_slowly(
        dst: Dst, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: DstConn
    ) -> None:
        started = time.monotonic()
        while chunk := await reader.read(16 * KiB):
            dst.keep_data(conn, chunk)
            ahead = conn.received_total / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    return read_slowly


def resetter(after: int) -> Behaviour:
    """Read `after` bytes, send a little, then close with a reset (SO_LINGER 0)."""

    async def reset(
        dst: Dst, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: DstConn
    ) -> None:
        while conn.received_total < after and (chunk := await reader.read(65536)):
            dst.keep_data(conn, chunk)
        writer.write(b"partial answer")
        await writer.drain()
        rst_close(writer)

    return reset


@contextlib.asynccontextmanager
async def dst_server(behaviour: Behaviour = collect, keep: int = 8 * MiB) -> AsyncIterator[Dst]:
    dst = Dst(behaviour, keep)
    dst.server = await asyncio.start_server(dst._handle, "127.0.0.1", 0)
    try:
        yield dst
    finally:
        await dst.shutdown()


@contextlib.contextmanager
def refusing_address() -> Iterator[str]:
    """A loopback port with nothing listening (bound, so nobody else takes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def blackhole_address() -> Iterator[str]:
    """A loopback port where connect() hangs: a listener with backlog 0 whose
    accept queue is already full, so the kernel drops every further SYN."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    addr = listener.getsockname()
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            sock = socket.socket()
            sock.setblocking(False)
            fillers.append(sock)
            sock.connect_ex(addr)
            time.sleep(0.02)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect(addr)
            raise AssertionError("the blackhole listener still completes connections")
        except TimeoutError:
            pass
        finally:
            probe.close()
        yield f"127.0.0.1:{addr[1]}"
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- the server's side ------------------------------------------------------------


def lines_for_port(lines: list[str], port: int) -> list[str]:
    """Log lines naming the peer 127.0.0.1:port."""
    needle = re.compile(rf"127\.0\.0\.1:{port}\b")
    return [line for line in lines if needle.search(line)]


class RssWatch:
    """Samples a server's RSS every 100 ms; `growth` is the peak over the start."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.start = server.rss()
        self.peak = self.start
        self._task: asyncio.Future[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.server.rss())
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> RssWatch:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, self.server.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start
