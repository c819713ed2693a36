"""Debian's v2ray-plugin as the client, on a link slower than dst, dst ending first.

    SOCKS5 client --> ss-local --> ss-v2ray-plugin (tls or not, mux=0)
        --> pacing proxy (server-to-client at ~10 MB/s) ==WS==> mtt-mu-server
        --> ss-server (the user's dst) --> HTTP/1.0 server (closes after each body)

v2ray core 4.34 drops what it has received but not yet delivered when it reads
a close frame, so the close frame must reach it only after the last data has
(README, "Closing:"). Every body is checked by sha256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.client_support import eventually
from tests.support import pattern, running_server

from .test_sip003 import METHOD, PASSWORD, free_port, process, socks5_get, wait_listening

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MiB = 1 << 20
BODIES = [pattern(100 + i, 2 * MiB + i * 700_001) for i in range(4)]  # 2 MiB .. ~4 MiB
DIGESTS = [hashlib.sha256(body).digest() for body in BODIES]
DOWNLOADS = 48
AT_ONCE = 8
PACE_BYTES_PER_S = 10_000_000
# A Unix socket buffers far less than TCP: a slower link still leaves more in it
# when dst ends than 100 ms of "client quiet" can carry.
PACE_BYTES_PER_S_UNIX = 3_000_000
PACE_CHUNK = 16 * 1024


@contextlib.asynccontextmanager
async def body_server() -> AsyncIterator[int]:
    """GET /<n> answers BODIES[n], HTTP/1.0 style: the server closes after the body."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            head = await reader.readuntil(b"\r\n\r\n")
            body = BODIES[int(head.split(b" ", 2)[1].lstrip(b"/"))]
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            writer.write(body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float) -> None:
    """Copy until EOF; with a rate, read no faster than it (the slow link's back-pressure)."""
    loop = asyncio.get_running_loop()
    started, sent = loop.time(), 0
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(PACE_CHUNK):
            writer.write(data)
            await writer.drain()
            if rate:
                sent += len(data)
                ahead = started + sent / rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        if writer.can_write_eof():
            writer.write_eof()


@contextlib.asynccontextmanager
async def pacing_proxy(upstream: str, rate: float) -> AsyncIterator[int]:
    """A TCP proxy on loopback to `upstream` (host:port, or a Unix socket's path)
    whose server-to-client direction runs at `rate` bytes/s."""
    tasks: set[asyncio.Task[None]] = set()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            if upstream.startswith("/"):
                dialing = asyncio.open_unix_connection(upstream, limit=PACE_CHUNK)
            else:
                host, port = upstream.rsplit(":", 1)
                dialing = asyncio.open_connection(host, int(port), limit=PACE_CHUNK)
            server_r, server_w = await asyncio.wait_for(dialing, 10)
        except OSError:
            client_w.close()
            return
        # A small receive buffer, as on a slow link: unread bytes stay in the server's queue.
        server_w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        try:
            await asyncio.gather(_pump(client_r, server_w, 0), _pump(server_r, client_w, rate))
        finally:
            client_w.close()
            server_w.close()

    def start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(start, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("listener", ["tls", "plain-http", "unix"])
async def test_v2ray_plugin_downloads_arrive_whole_when_dst_closes_first(
    tls_files: tuple[Path, Path], tmp_path: Path, listener: str
) -> None:
    """A unix listener serves plain HTTP, as behind a web server on the same host."""
    if shutil.which("ss-v2ray-plugin") is None:
        raise RuntimeError("ss-v2ray-plugin not found: this test needs shadowsocks-v2ray-plugin")
    cert, key = tls_files
    ss_port = free_port()
    local_port = free_port()
    server_args: tuple[str, ...] = ()
    bind: dict[str, str] = {}
    rate, plugin_tls = PACE_BYTES_PER_S, ""
    if listener == "tls":
        server_args, plugin_tls = ("-cert", str(cert), "-key", str(key)), f"tls;cert={cert};"
    elif listener == "unix":
        server_args, bind = ("-bind-unix",), {"bind": str(tmp_path / "mtt.sock")}
        rate = PACE_BYTES_PER_S_UNIX
    with (
        running_server(*server_args, **bind) as server,
        process(["ss-server", "-s", "127.0.0.1", "-p", str(ss_port), "-k", PASSWORD, "-m", METHOD]),
    ):
        await wait_listening(ss_port)
        server.add("/v2", f"127.0.0.1:{ss_port}")
        async with (
            body_server() as http_port,
            pacing_proxy(server.tunnel, rate) as port,
        ):
            ss_local = [
                "ss-local",
                *("-s", "127.0.0.1", "-p", str(port), "-b", "127.0.0.1"),
                *("-l", str(local_port), "-k", PASSWORD, "-m", METHOD),
                *("--plugin", "ss-v2ray-plugin"),
                *("--plugin-opts", f"{plugin_tls}host=tunnel.test;path=/v2;mux=0"),
            ]
            with process(ss_local) as (_, log_path):
                # ss-local listens at once; the plugin only once v2ray says it started.
                await eventually(lambda: "started" in log_path.read_text(), 15)
                await wait_listening(local_port)
                slots = asyncio.Semaphore(AT_ONCE)

                async def download(i: int) -> str | None:
                    """None when the body arrived whole, else what arrived."""
                    which = i % len(BODIES)
                    async with slots:
                        try:
                            body = await asyncio.wait_for(
                                socks5_get(local_port, "127.0.0.1", http_port, f"/{which}"), 30
                            )
                        except (AssertionError, ConnectionError, asyncio.IncompleteReadError):
                            return "no response"
                    if hashlib.sha256(body).digest() == DIGESTS[which]:
                        return None
                    return f"{len(body)} of {len(BODIES[which])} bytes"

                results = await asyncio.gather(*(download(i) for i in range(DOWNLOADS)))
                bad = [r for r in results if r is not None]
                assert not bad, f"{len(bad)} of {DOWNLOADS} downloads not whole: {bad}"
