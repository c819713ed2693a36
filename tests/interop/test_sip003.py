"""mtt-client as a real SIP003 plugin of shadowsocks-libev.

    SOCKS5 client --> ss-local --> mtt-client (plugin) ==TLS/WS==> mtt-mu-server
                      --> ss-server (the user's dst) --> HTTP server on 127.0.0.1

ss-local starts the plugin with SS_REMOTE_*/SS_LOCAL_* and SS_PLUGIN_OPTIONS,
exactly as a user's shadowsocks client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.client_support import client_command, eventually
from tests.support import pattern, running_server

pytestmark = pytest.mark.interop

PASSWORD = "mtt-sip003-test"
METHOD = "chacha20-ietf-poly1305"
BODY = pattern(42, 3 * 1024 * 1024 + 17)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def process(argv: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process whose stderr+stdout go to a file; SIGTERM, then SIGKILL, at the end."""
    for tool in ("ss-server", "ss-local"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: the SIP003 test needs shadowsocks-libev")
    with tempfile.NamedTemporaryFile(prefix="mtt-sip003-", suffix=".log", delete=False) as log:
        path = Path(log.name)
    with open(path, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        path.unlink(missing_ok=True)


async def wait_listening(port: int, limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[int]:
    """Serves BODY for any GET, HTTP/1.0 style (closes after the response)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % len(BODY)
            )
            writer.write(BODY)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def socks5_get(proxy_port: int, host: str, port: int, path: str) -> bytes:
    """GET http://host:port/path through a SOCKS5 proxy (no auth, CONNECT by name)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        name = host.encode()
        writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
        head = await reader.readexactly(4)
        assert head[:2] == b"\x05\x00", f"SOCKS5 CONNECT failed: {head!r}"
        await reader.readexactly({1: 4 + 2, 4: 16 + 2}.get(head[3], 0) or 1)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
    header, _, body = response.partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.0 200"), header[:200]
    return body


@pytest.mark.parametrize("options", ["wss;wss-path=/ss;sv;n=tunnel.test", "wss-path=ss;mux;sv"])
async def test_fetch_through_ss_local_with_our_plugin(
    tls_files: tuple[Path, Path], options: str
) -> None:
    cert, key = tls_files
    ss_port = free_port()
    local_port = free_port()
    with (
        running_server("-cert", str(cert), "-key", str(key)) as server,
        process(["ss-server", "-s", "127.0.0.1", "-p", str(ss_port), "-k", PASSWORD, "-m", METHOD]),
    ):
        await wait_listening(ss_port)
        server.add("/ss", f"127.0.0.1:{ss_port}")
        plugin = client_command()
        if len(plugin) != 1:
            raise RuntimeError("the mtt-client console script is not installed")
        ss_local = [
            "ss-local",
            *("-s", "127.0.0.1", "-p", str(server.port), "-b", "127.0.0.1"),
            *("-l", str(local_port), "-k", PASSWORD, "-m", METHOD),
            *("--plugin", plugin[0], "--plugin-opts", options),
        ]
        async with http_server() as http_port:
            with process(ss_local) as (local, log_path):
                await eventually(lambda: "listening on" in log_path.read_text(), 15)
                plugin_pids = children(local.pid)
                text = log_path.read_text()
                assert "running as a SIP003 plugin" in text, text
                await wait_listening(local_port)
                for _ in range(2):
                    body = await asyncio.wait_for(
                        socks5_get(local_port, "127.0.0.1", http_port, "/file"), 30
                    )
                    assert hashlib.sha256(body).digest() == hashlib.sha256(BODY).digest()
                text = log_path.read_text()
                assert "Traceback" not in text, text
                warnings = [line for line in text.splitlines() if "WARNING" in line]
                # Without `wss` the Go client would not speak WebSocket; we say so, once.
                assert len(warnings) == (0 if "wss;" in options else 1), text
            # ss-local stops its plugin; make sure, and never leave it behind.
            leftovers = [pid for pid in plugin_pids if alive(pid)]
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
            assert not leftovers, "the plugin outlived ss-local"
