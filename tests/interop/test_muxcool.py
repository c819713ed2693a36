"""Mux.Cool from Debian's real clients, demultiplexed by the server (docs/protocol.md §11).

    (a) SOCKS5 client --> ss-local --> ss-v2ray-plugin (its default, mux=1; tls or not)
            ==WS==> mtt-mu-server --> ss-server (the user's dst) --> HTTP server
    (b) HTTP client --> v2ray (dokodemo-door --> freedom, mux concurrency 8, ws + tls)
            ==WS==> mtt-mu-server --> HTTP server (the user's dst)

Neither dst speaks Mux.Cool: each transfer arrives whole (sha256 both ways)
only if the server took the frames apart. The user's "mux" picks Mux.Cool in
one case, the server's -mux-protocol in the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import struct
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.client_support import eventually
from tests.support import ServerProcess, pattern, running_server

from .test_sip003 import METHOD, PASSWORD, free_port, process, wait_listening

pytestmark = pytest.mark.interop

MiB = 1 << 20
BODIES = [pattern(300 + i, MiB + i * 300_001) for i in range(4)]  # 1 MiB .. ~1.9 MiB
UPLOADS = [pattern(400 + i, MiB // 2 + i * 200_003) for i in range(4)]

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[int]:
    """GET /<n>: BODIES[n]; POST: the sha256 of the body, hex. HTTP/1.0: closes after."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            head = await reader.readuntil(b"\r\n\r\n")
            method, target = head.split(b" ", 2)[:2]
            if method == b"POST":
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = hashlib.sha256(await reader.readexactly(length)).hexdigest().encode()
            else:
                body = BODIES[int(target.lstrip(b"/"))]
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            writer.write(body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def exchange(open_conn: Opener, request: bytes) -> bytes:
    """One HTTP/1.0 request on a fresh connection; the body of its 200."""
    reader, writer = await open_conn()
    try:
        writer.write(request)
        response = await reader.read()
    finally:
        writer.close()
    header, _, body = response.partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.0 200"), header[:200]
    return body


async def transfers(open_conn: Opener, count: int) -> list[str]:
    """`count` downloads and uploads at once; what went wrong, one line each."""

    async def one(i: int) -> str | None:
        try:
            if i % 2:
                which = (i // 2) % len(UPLOADS)
                data = UPLOADS[which]
                request = b"POST /up HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(data) + data
                got = await asyncio.wait_for(exchange(open_conn, request), 20)
                if got != hashlib.sha256(data).hexdigest().encode():
                    return f"upload {i}: the server hashed something else"
            else:
                which = (i // 2) % len(BODIES)
                got = await asyncio.wait_for(
                    exchange(open_conn, b"GET /%d HTTP/1.0\r\n\r\n" % which), 20
                )
                if hashlib.sha256(got).digest() != hashlib.sha256(BODIES[which]).digest():
                    return f"download {i}: {len(got)} of {len(BODIES[which])} bytes"
        except (AssertionError, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            return f"transfer {i}: {exc!r}"
        return None

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return [r for r in results if r is not None]


def socks5_opener(proxy_port: int, host: str, port: int) -> Opener:
    async def open_conn() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        name = host.encode()
        writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
        head = await reader.readexactly(4)
        assert head[:2] == b"\x05\x00", f"SOCKS5 CONNECT failed: {head!r}"
        await reader.readexactly({1: 4 + 2, 4: 16 + 2}.get(head[3], 0) or 1)
        return reader, writer

    return open_conn


def direct_opener(port: int) -> Opener:
    async def open_conn() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port)

    return open_conn


def add_user(server: ServerProcess, path: str, dst: str, **settings: str) -> None:
    status, reply = server.control(
        {"opt": 1, "args_bunch": [{"path": path, "dst": dst, **settings}]}
    )
    assert (status, reply["res"]) == (200, 1), reply


def listed(server: ServerProcess, path: str) -> dict[str, object]:
    status, reply = server.control({"opt": 5, "args_bunch": [{"path": path}]})
    assert status == 200, reply
    (user,) = reply["users"]
    assert isinstance(user, dict)
    return user


def metric(server: ServerProcess, line_start: str) -> float:
    with urllib.request.urlopen(f"http://{server.controller}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    (line,) = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize("listener", ["tls", "plain-http"])
async def test_v2ray_plugin_default_mux_reaches_a_plain_ss_server(
    tls_files: tuple[Path, Path], listener: str
) -> None:
    """tls: the user's "mux" says mux.cool; plain-http: the server's -mux-protocol does."""
    if shutil.which("ss-v2ray-plugin") is None:
        raise RuntimeError("ss-v2ray-plugin not found: this test needs shadowsocks-v2ray-plugin")
    cert, key = tls_files
    ss_port, local_port = free_port(), free_port()
    if listener == "tls":
        server_args: tuple[str, ...] = ("-cert", str(cert), "-key", str(key))
        plugin_opts, user_mux = f"tls;cert={cert};host=tunnel.test;path=/v2", {"mux": "mux.cool"}
    else:
        server_args, plugin_opts, user_mux = (
            ("-mux-protocol", "mux.cool"),
            "host=tunnel.test;path=/v2",
            {},
        )
    with (
        running_server(*server_args) as server,
        process(["ss-server", "-s", "127.0.0.1", "-p", str(ss_port), "-k", PASSWORD, "-m", METHOD]),
    ):
        await wait_listening(ss_port)
        add_user(server, "/v2", f"127.0.0.1:{ss_port}", **user_mux)
        async with http_server() as http_port:
            ss_local = [
                "ss-local",
                *("-s", "127.0.0.1", "-p", str(server.port), "-b", "127.0.0.1"),
                *("-l", str(local_port), "-k", PASSWORD, "-m", METHOD),
                *("--plugin", "ss-v2ray-plugin", "--plugin-opts", plugin_opts),  # no mux=: 1
            ]
            with process(ss_local) as (_, log_path):
                await eventually(lambda: "started" in log_path.read_text(), 15)
                await wait_listening(local_port)
                opener = socks5_opener(local_port, "127.0.0.1", http_port)
                bad = await transfers(opener, 16)
                assert not bad, f"{len(bad)} of 16 transfers went wrong: {bad}"
        assert metric(server, 'mtt_tunnels_opened_total{mode="muxcool"}') >= 1
        assert metric(server, 'mtt_tunnels_opened_total{mode="plain"}') == 0
        assert metric(server, "mtt_streams_opened_total") >= 16
        user = listed(server, "/v2")
        assert user["bytes_up"] >= sum(len(u) for u in UPLOADS) * 2  # type: ignore[operator]
        assert "protocol error" not in server.log_text(), server.log_text()


def v2ray_config(local_port: int, server: ServerProcess) -> dict[str, object]:
    """What v2ray-plugin builds in code (dokodemo-door --> freedom with mux over ws),
    with concurrency 8 and TLS; the dokodemo-door target is never used."""
    return {
        "log": {"loglevel": "warning"},
        "inbounds": [
            {
                "listen": "127.0.0.1",
                "port": local_port,
                "protocol": "dokodemo-door",
                "settings": {"address": "192.0.2.1", "port": 9, "network": "tcp"},
            }
        ],
        "outbounds": [
            {
                "protocol": "freedom",
                "settings": {"redirect": f"127.0.0.1:{server.port}"},
                "mux": {"enabled": True, "concurrency": 8},
                "streamSettings": {
                    "network": "ws",
                    "wsSettings": {"path": "/v2ray", "headers": {"Host": "tunnel.test"}},
                    "security": "tls",
                    "tlsSettings": {"serverName": "tunnel.test", "allowInsecure": True},
                },
            }
        ],
    }


async def test_v2ray_with_mux_concurrency_8(tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    if shutil.which("v2ray") is None:
        raise RuntimeError("v2ray not found: this test needs Debian's v2ray")
    cert, key = tls_files
    local_port = free_port()
    with running_server("-cert", str(cert), "-key", str(key)) as server:
        async with http_server() as http_port:
            add_user(server, "/v2ray", f"127.0.0.1:{http_port}", mux="mux.cool")
            config = tmp_path / "v2ray.json"
            config.write_text(json.dumps(v2ray_config(local_port, server)))
            with process(["v2ray", "-config", str(config)]) as (_, log_path):
                await eventually(lambda: "started" in log_path.read_text(), 15)
                await wait_listening(local_port)
                bad = await transfers(direct_opener(local_port), 24)
                assert not bad, f"{len(bad)} of 24 transfers went wrong: {bad}"
        user = listed(server, "/v2ray")
        # 24 transfers at once, 8 to a WebSocket: a handful of tunnels, not 24.
        assert 3 <= user["total_tunnels"] < 24, user  # type: ignore[operator]
        assert metric(server, "mtt_streams_opened_total") >= 24
        assert "protocol error" not in server.log_text(), server.log_text()
