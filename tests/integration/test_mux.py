"""smux inside the WebSocket, driven from the client side by our own sans-I/O
session over a real TLS WebSocket (the Go peers test the same from Go)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import time
from collections import defaultdict
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from mtt.smux import (
    Cmd,
    SmuxConfig,
    SmuxSession,
    StreamData,
    StreamEnded,
    encode_frame,
)
from tests.integration.hostile_helpers import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    upgrade_request,
    ws_frame,
)
from tests.support import ServerProcess, echo_server, pattern, running_server, tagged_server

MiB = 1024 * 1024


class MuxClient:
    """A minimal smux client over a websockets connection, for tests."""

    def __init__(self, ws: ClientConnection, version: int = 1) -> None:
        self.ws = ws
        self.session = SmuxSession(SmuxConfig(is_client=True, version=version), time.monotonic())
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.ended: set[int] = set()
        self.changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                assert isinstance(message, bytes)
                for event in self.session.receive_data(message, time.monotonic()):
                    if isinstance(event, StreamData):
                        self.received[event.stream_id] += event.data
                        self.session.consumed(event.stream_id, len(event.data))
                    elif isinstance(event, StreamEnded):
                        self.ended.add(event.stream_id)
                await self.flush()
                self.changed.set()
        except ConnectionClosed:
            pass
        self.changed.set()

    async def flush(self) -> None:
        out = self.session.data_to_send()
        if out:
            await self.ws.send(out)

    async def open(self) -> int:
        sid = self.session.open_stream()
        await self.flush()
        return sid

    async def send(self, sid: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            taken = self.session.send_data(sid, view[: 64 * 1024])
            await self.flush()
            if taken == 0:
                self.changed.clear()
                await asyncio.wait_for(self.changed.wait(), 10)
            view = view[taken:]

    async def wait_for(self, predicate, limit_s: float = 30) -> None:  # type: ignore[no-untyped-def]
        """Wait until predicate() holds; rechecked on every message and every 50 ms."""
        async with asyncio.timeout(limit_s):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()


def mux_connect(
    server: ServerProcess, ctx: ssl.SSLContext, path: str, subprotocols: list[str] | None = None
) -> connect:
    return connect(
        f"wss://tunnel.test:{server.port}{path}",
        ssl=ctx,
        host="127.0.0.1",
        port=server.port,
        server_hostname="tunnel.test",
        subprotocols=subprotocols if subprotocols is not None else ["smux_on"],  # type: ignore[arg-type]
        max_size=None,
        compression=None,
    )


@pytest.mark.parametrize("version", [1, 2])
async def test_streams_echo_byte_exact(
    tls_server: ServerProcess, client_tls: ssl.SSLContext, version: int
) -> None:
    async with echo_server() as echo:
        tls_server.add("/m", echo.addr)
        async with mux_connect(tls_server, client_tls, "/m") as ws:
            assert ws.subprotocol == "smux_on"
            client = MuxClient(ws, version)
            sids = [await client.open() for _ in range(8)]
            assert sids == [3, 5, 7, 9, 11, 13, 15, 17]
            payloads = {sid: pattern(sid, MiB + sid) for sid in sids}
            await asyncio.gather(*(client.send(sid, data) for sid, data in payloads.items()))
            await client.wait_for(
                lambda: all(len(client.received[s]) >= len(payloads[s]) for s in sids)
            )
            for sid in sids:
                assert (
                    hashlib.sha256(client.received[sid]).digest()
                    == hashlib.sha256(payloads[sid]).digest()
                )
            assert echo.connections == 8
            await client.close()


async def test_seventeenth_stream_is_refused_and_session_survives(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with echo_server() as echo:
        tls_server.add("/lim", echo.addr)
        async with mux_connect(tls_server, client_tls, "/lim") as ws:
            client = MuxClient(ws)
            sids = [await client.open() for _ in range(17)]
            await client.wait_for(lambda: sids[16] in client.ended)
            for sid in sids[:16]:
                await client.send(sid, b"hello %d" % sid)
            await client.wait_for(
                lambda: all(len(client.received[s]) == len(b"hello %d" % s) for s in sids[:16])
            )
            assert sids[16] not in client.received
            assert all(s not in client.ended for s in sids[:16])
            await asyncio.sleep(0.2)
            assert echo.connections == 16
            await client.close()


async def test_client_fin_closes_dst_and_server_fin_follows(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with echo_server() as echo:
        tls_server.add("/fin", echo.addr)
        async with mux_connect(tls_server, client_tls, "/fin") as ws:
            client = MuxClient(ws)
            sid = await client.open()
            await client.send(sid, b"abc")
            await client.wait_for(lambda: bytes(client.received[sid]) == b"abc")
            client.session.close_stream(sid)
            await client.flush()
            await client.wait_for(lambda: echo.open == 0 and echo.connections == 1)
            await client.close()


async def test_protocol_error_closes_the_websocket_with_1002(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    tls_server.add("/bad", "127.0.0.1:9")
    async with mux_connect(tls_server, client_tls, "/bad") as ws:
        await ws.send(encode_frame(1, Cmd.SYN, 3) + b"\x07\x00\x00\x00\x03\x00\x00\x00")
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1002
    await asyncio.sleep(0.1)
    assert "smux protocol error" in tls_server.log_text()


async def test_mux_flag_selects_smux_without_subprotocol(cert_files: tuple[Path, Path]) -> None:
    ctx = ssl.create_default_context(cafile=str(cert_files[0]))
    with running_server("-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-mux") as server:
        async with echo_server() as echo:
            server.add("/d", echo.addr)
            async with mux_connect(server, ctx, "/d", subprotocols=[]) as ws:
                assert ws.subprotocol is None
                client = MuxClient(ws)
                sid = await client.open()
                await client.send(sid, b"muxed")
                await client.wait_for(lambda: bytes(client.received[sid]) == b"muxed")
                await client.close()


@pytest.mark.slow
async def test_slow_dst_stops_reading_the_websocket(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    """A dst that never reads: the server stops reading the session instead of buffering."""
    stalled: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # never reads

    dst = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = dst.sockets[0].getsockname()[1]
        tls_server.add("/slow", f"127.0.0.1:{port}")
        async with mux_connect(tls_server, client_tls, "/slow") as ws:
            client = MuxClient(ws)
            sid = await client.open()
            sent = 0
            chunk = pattern(1, 64 * 1024)

            async def push() -> None:
                nonlocal sent
                while sent < 256 * MiB:
                    await client.send(sid, chunk)
                    sent += len(chunk)

            rss_before = tls_server.rss()
            pusher = asyncio.ensure_future(push())
            await asyncio.sleep(4)
            pusher.cancel()
            growth = tls_server.rss() - rss_before
            assert growth < 16 * MiB, growth
            # Kernel buffers on both hops plus the 256 KiB budget and dst high-water
            # are all that can be absorbed; far below the 256 MiB offered.
            assert sent < 48 * MiB, sent
            await client.close()
    finally:
        dst.close()


def fetch_dropping_at_fin(
    port: int, ctx: ssl.SSLContext, path: str, version: int, rate: float
) -> tuple[bytes, int]:
    """Read one smux stream the way a hasty client does: its application takes
    `rate` bytes/s from a small buffer, and when the stream's FIN arrives it drops
    what it has received but not yet handed on (v2ray-plugin treats a close frame
    so). Returns (bytes handed on, bytes dropped at the FIN)."""
    queue_max, read_size = 32 * 1024, 16 * 1024
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # a slow link holds little
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    with ctx.wrap_socket(raw, server_hostname="tunnel.test") as tls:
        tls.sendall(upgrade_request(path, subprotocol="smux_on"))
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            chunk = tls.recv(4096)
            assert chunk, "no upgrade reply"
            buf += chunk
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        buf = bytearray(rest)
        session = SmuxSession(SmuxConfig(is_client=True, version=version), time.monotonic())
        sid = session.open_stream()
        tls.sendall(ws_frame(OP_BINARY, session.data_to_send()))
        tls.settimeout(0.005)
        queue, delivered = bytearray(), bytearray()
        frame_left, opcode, tokens = 0, 0, 0.0
        last = time.monotonic()
        deadline = last + 30
        while True:
            now = time.monotonic()
            assert now < deadline, f"no FIN after {len(delivered)} bytes"
            tokens = min(tokens + (now - last) * rate, read_size)
            last = now
            take = min(len(queue), int(tokens))
            if take:
                delivered += queue[:take]
                del queue[:take]
                tokens -= take
                session.consumed(sid, take)
                if out := session.data_to_send():
                    tls.sendall(ws_frame(OP_BINARY, out))
            if len(queue) >= queue_max:
                time.sleep(0.005)
                continue
            try:
                data = tls.recv(read_size)
            except TimeoutError:
                continue
            assert data, f"EOF without a FIN after {len(delivered) + len(queue)} bytes"
            buf += data
            # Server frames are unmasked; their payload goes to smux as it arrives.
            while buf:
                if not frame_left:
                    if len(buf) < 2:
                        break
                    opcode, size, offset = buf[0] & 0x0F, buf[1] & 0x7F, 2
                    if size >= 126:
                        offset = 4 if size == 126 else 10
                        if len(buf) < offset:
                            break
                        size = int.from_bytes(buf[2:offset], "big")
                    assert opcode != OP_CLOSE, "close frame before the stream's FIN"
                    del buf[:offset]
                    frame_left = size
                    if not size:
                        continue
                payload = bytes(buf[:frame_left])
                del buf[: len(payload)]
                frame_left -= len(payload)
                if opcode not in (OP_BINARY, OP_CONT):
                    continue
                for event in session.receive_data(payload, time.monotonic()):
                    if isinstance(event, StreamData):
                        queue += event.data
                    elif isinstance(event, StreamEnded):
                        return bytes(delivered), len(queue)


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
async def test_stream_fin_reaches_a_slow_client_after_all_its_data(
    tls_server: ServerProcess, client_tls: ssl.SSLContext, version: int
) -> None:
    """dst sends a body and closes; the client reads at 8 MB/s, far slower than dst."""
    body = pattern(7, 2 * MiB + 3)
    async with tagged_server(body) as dst:
        tls_server.add("/body", dst)
        delivered, dropped = await asyncio.to_thread(
            fetch_dropping_at_fin, tls_server.port, client_tls, "/body", version, 8e6
        )
    assert dropped == 0, f"the FIN came {dropped} bytes early"
    assert hashlib.sha256(delivered).digest() == hashlib.sha256(body).digest()
