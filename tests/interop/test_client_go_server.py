"""Our mtt-client against gorelay, a Go server built on gorilla/websocket and
xtaci/smux (the libraries of mos-tls-tunnel): plain and smux v1, checksummed.

gorelay speaks one smux version (-smux-version), and the Go client only v1.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.gopeers import Peer

from tests.client_support import ClientProcess, echo_round_trip, running_client

pytestmark = pytest.mark.interop

MiB = 1 << 20
StartPeer = Callable[[list[str]], tuple[Peer, str]]
MODES = {"plain": (), "mux": ("-mux", "-mux-max-stream", "4")}


async def upload(client: ClientProcess, size: int, seed: int) -> bool:
    """The upload dst: u64 length, the bytes; it answers their sha256."""
    reader, writer = await asyncio.open_connection(*client.host_port)
    data = random.Random(seed).randbytes(size)
    writer.write(struct.pack(">Q", size))
    writer.write(data)
    await writer.drain()
    digest = await asyncio.wait_for(reader.readexactly(32), 30)
    writer.close()
    return digest == hashlib.sha256(data).digest()


async def download(client: ClientProcess, size: int) -> bool:
    """The download dst: u64 length N; it sends N bytes, then their sha256."""
    reader, writer = await asyncio.open_connection(*client.host_port)
    writer.write(struct.pack(">Q", size))
    data = await asyncio.wait_for(reader.readexactly(size), 30)
    digest = await asyncio.wait_for(reader.readexactly(32), 10)
    writer.close()
    return digest == hashlib.sha256(data).digest()


@pytest.mark.parametrize("mode", list(MODES))
async def test_client_through_gorelay(
    go_bins: dict[str, Path],
    go_peer: StartPeer,
    dsts: dict[str, int],
    tls_files: tuple[Path, Path],
    mode: str,
) -> None:
    cert, key = tls_files
    routes = [arg for name, port in dsts.items() for arg in ("-route", f"/{name}=127.0.0.1:{port}")]
    tls = ("-cert", str(cert), "-key", str(key))
    relay, addr = go_peer(
        [str(go_bins["gorelay"]), "-b", "127.0.0.1:0", *tls, "-smux-version", "1", *routes]
    )
    env = {"SSL_CERT_FILE": str(cert)}

    def args(path: str) -> list[str]:
        return ["-s", addr, "-n", "tunnel.test", "-wss", "-wss-path", path, "-verbose"]

    with (
        running_client(*args("/echo"), *MODES[mode], env=env) as echo,
        running_client(*args("/upload"), *MODES[mode], env=env) as up,
        running_client(*args("download"), *MODES[mode], env=env) as down,
    ):
        assert await echo_round_trip(echo, 4 * MiB, 1)
        assert all(await asyncio.gather(*(echo_round_trip(echo, 256 * 1024, i) for i in range(16))))
        assert await upload(up, 8 * MiB, 2)
        assert await download(down, 8 * MiB)
        assert all(await asyncio.gather(*(upload(up, MiB, i) for i in range(6))))
        # Go's crypto/tls issues session tickets: the echo client's later dials resume.
        await echo.wait_for_log("TLS session resumed")
    assert relay.poll() is None, relay.stderr_text()
    for client in (echo, up, down):
        assert "WARNING" not in client.log_text(), client.log_text()


async def test_a_404_from_gorelay_closes_only_that_connection(
    go_bins: dict[str, Path],
    go_peer: StartPeer,
    dsts: dict[str, int],
    tls_files: tuple[Path, Path],
) -> None:
    cert, key = tls_files
    tls = ("-cert", str(cert), "-key", str(key))
    route = ("-route", f"/echo=127.0.0.1:{dsts['echo']}")
    _, addr = go_peer([str(go_bins["gorelay"]), "-b", "127.0.0.1:0", *tls, *route])
    args = ["-s", addr, "-n", "tunnel.test", "-wss", "-wss-path", "/nope"]
    with running_client(*args, env={"SSL_CERT_FILE": str(cert)}) as client:
        reader, writer = await asyncio.open_connection(*client.host_port)
        assert await asyncio.wait_for(reader.read(), 15) == b""
        writer.close()
        await client.wait_for_log("upgrade rejected: HTTP 404")
        assert client.proc.poll() is None
