"""Our server against Go peers built from Debian's gorilla/websocket and
xtaci/smux: the mtt-client stand-in and the wsload driver."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.gopeers import run_wsload

from tests.support import ServerProcess, pattern, running_server

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.fixture
def server(tls_files: tuple[Path, Path]) -> Iterator[ServerProcess]:
    cert, key = tls_files
    with running_server("-cert", str(cert), "-key", str(key)) as s:
        yield s


def add_routes(server: ServerProcess, dsts: dict[str, int]) -> None:
    for name, port in dsts.items():
        server.add(f"/{name}", f"127.0.0.1:{port}")


async def wsload(
    server: ServerProcess, tls_files: tuple[Path, Path], path: str, *args: str, limit_s: float = 90
) -> dict[str, Any]:
    """wsload through our server, with SNI and Host tunnel.test and the test CA."""
    result = await run_wsload(
        [
            "-url",
            f"wss://tunnel.test{path}",
            "-connect",
            server.tunnel,
            "-ca",
            str(tls_files[0]),
            *args,
        ],
        limit_s=limit_s,
    )
    assert result["ok"], result
    return result


@pytest.mark.parametrize("pattern_name", ["echo", "upload", "download"])
async def test_plain_go_client_checksums(
    go_bins: dict[str, Path],
    server: ServerProcess,
    dsts: dict[str, int],
    tls_files: tuple[Path, Path],
    pattern_name: str,
) -> None:
    add_routes(server, dsts)
    conns = 16 if pattern_name == "echo" else 2
    result = await wsload(
        server,
        tls_files,
        f"/{pattern_name}",
        "-mode",
        "plain",
        "-subprotocol",
        "smux_off",
        "-conns",
        str(conns),
        "-bytes",
        str(4 * MiB),
        "-pattern",
        pattern_name,
    )
    assert result["streams_ok"] == conns


@pytest.mark.parametrize("version", ["1", "2"])
async def test_smux_32_concurrent_streams(
    go_bins: dict[str, Path],
    server: ServerProcess,
    dsts: dict[str, int],
    tls_files: tuple[Path, Path],
    version: str,
) -> None:
    add_routes(server, dsts)
    result = await wsload(
        server,
        tls_files,
        "/echo",
        "-mode",
        "mux",
        "-smux-version",
        version,
        "-conns",
        "2",
        "-streams",
        "16",
        "-bytes",
        str(MiB),
        "-pattern",
        "echo",
    )
    assert result["streams_ok"] == 32
    assert result["bytes_total"] == 32 * 2 * MiB


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("pattern_name", ["echo", "upload", "download"])
async def test_smux_8_mib_on_one_stream(
    go_bins: dict[str, Path],
    server: ServerProcess,
    dsts: dict[str, int],
    tls_files: tuple[Path, Path],
    version: str,
    pattern_name: str,
) -> None:
    add_routes(server, dsts)
    result = await wsload(
        server,
        tls_files,
        f"/{pattern_name}",
        "-mode",
        "mux",
        "-smux-version",
        version,
        "-conns",
        "1",
        "-streams",
        "1",
        "-bytes",
        str(8 * MiB),
        "-pattern",
        pattern_name,
    )
    assert result["streams_ok"] == 1


@pytest.mark.slow
async def test_smux_stream_idle_past_70s_still_works(
    go_bins: dict[str, Path], tls_files: tuple[Path, Path], dsts: dict[str, int]
) -> None:
    """Keepalive both ways: v1 and v2 sessions idle for 75 s (past the 70 s
    timeout) still carry data. Both run at once to keep the suite short; the
    tunnel idle timeout is raised so only smux keepalive is exercised."""
    cert, key = tls_files
    with running_server("-cert", str(cert), "-key", str(key), "-timeout", "5m") as server:
        add_routes(server, dsts)
        results = await asyncio.gather(
            *(
                wsload(
                    server,
                    tls_files,
                    "/echo",
                    "-mode",
                    "mux",
                    "-smux-version",
                    version,
                    "-conns",
                    "1",
                    "-streams",
                    "2",
                    "-bytes",
                    str(MiB),
                    "-pattern",
                    "echo",
                    "-idle",
                    "75s",
                    limit_s=150,
                )
                for version in ("1", "2")
            )
        )
        assert [r["streams_ok"] for r in results] == [2, 2]


async def test_mux_flag_without_subprotocol(
    go_bins: dict[str, Path], tls_files: tuple[Path, Path], dsts: dict[str, int]
) -> None:
    cert, key = tls_files
    with running_server("-cert", str(cert), "-key", str(key), "-mux") as server:
        add_routes(server, dsts)
        result = await wsload(
            server,
            tls_files,
            "/echo",
            "-mode",
            "mux",
            "-subprotocol",
            "none",
            "-conns",
            "1",
            "-streams",
            "4",
            "-bytes",
            str(MiB),
            "-pattern",
            "echo",
        )
        assert result["streams_ok"] == 4


async def echo_through(port: int, size: int, seed: int) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    payload = pattern(seed, size)

    async def send() -> None:
        for i in range(0, size, 65536):
            writer.write(payload[i : i + 65536])
            await writer.drain()

    sender = asyncio.ensure_future(send())
    got = await asyncio.wait_for(reader.readexactly(size), 60)
    await sender
    writer.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def start_mttclient(
    go_peer: Any,
    go_bins: dict[str, Path],
    server: ServerProcess,
    tls_files: tuple[Path, Path],
    path: str,
    *extra: str,
) -> tuple[Any, int]:
    proc, local = go_peer(
        [
            str(go_bins["mttclient"]),
            "-b",
            "127.0.0.1:0",
            "-s",
            server.tunnel,
            "-n",
            "tunnel.test",
            "-ca",
            str(tls_files[0]),
            "-wss-path",
            path,
            *extra,
        ]
    )
    return proc, int(local.rsplit(":", 1)[1])


@pytest.mark.parametrize("extra", [[], ["-mux", "-mux-max-stream", "4"]], ids=["plain", "mux"])
async def test_go_mtt_client_end_to_end(
    go_bins: dict[str, Path],
    go_peer: Any,
    server: ServerProcess,
    tls_files: tuple[Path, Path],
    dsts: dict[str, int],
    extra: list[str],
) -> None:
    add_routes(server, dsts)
    client, port = start_mttclient(go_peer, go_bins, server, tls_files, "echo", *extra)
    await echo_through(port, 4 * MiB, seed=1)
    await asyncio.gather(*(echo_through(port, MiB, seed=s) for s in range(2, 14)))
    assert client.poll() is None, client.stderr_text()
    assert "panic" not in client.stderr_text()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["-mux", "-mux-max-stream", "4"]], ids=["plain", "mux"])
async def test_go_client_survives_hundreds_of_uploads_whose_dst_closes_first(
    go_bins: dict[str, Path],
    go_peer: Any,
    server: ServerProcess,
    tls_files: tuple[Path, Path],
    extra: list[str],
) -> None:
    """dst reads a little and hangs up while the client is still uploading.

    The Go client panics ("concurrent write to websocket connection") and loses
    every tunnel if the server closes under a write (docs/protocol.md §7); the stand-in
    keeps that hazard (test_go_peers shows it panicking against a naive server)."""
    accepted = 0

    async def short_dst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readexactly(4096)
            writer.write(b"enough")
            await writer.drain()
        writer.close()

    dst = await asyncio.start_server(short_dst, "127.0.0.1", 0)
    server.add("/short", f"127.0.0.1:{dst.sockets[0].getsockname()[1]}")
    client, port = start_mttclient(go_peer, go_bins, server, tls_files, "/short", *extra)
    block = pattern(9, 256 * 1024)

    async def one_upload() -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        with contextlib.suppress(ConnectionError):
            for _ in range(8):  # up to 2 MiB, far more than dst reads
                writer.write(block)
                await asyncio.wait_for(writer.drain(), 10)
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()

    try:
        for round_ in range(30):
            await asyncio.gather(*(one_upload() for _ in range(10)))
            assert client.poll() is None, f"client died in round {round_}:\n{client.stderr_text()}"
    finally:
        dst.close()
    assert accepted == 300
    assert "panic" not in client.stderr_text()
    await echo_ok_after(go_peer, go_bins, server, tls_files)


async def echo_ok_after(
    go_peer: Any, go_bins: dict[str, Path], server: ServerProcess, tls_files: tuple[Path, Path]
) -> None:
    """The server still serves normally after the storm."""
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    try:
        server.add("/after", f"127.0.0.1:{echo.sockets[0].getsockname()[1]}")
        _, port = start_mttclient(go_peer, go_bins, server, tls_files, "/after")
        await echo_through(port, MiB, seed=5)
    finally:
        echo.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
