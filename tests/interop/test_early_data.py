"""Our server against a client that sends WebSocket early data the way Xray's
does (docs/protocol.md §10), over TLS.

edclient (harness/go/edclient) stands in for Xray-core's WebSocket dialer
with `"path": "/ed?ed=2048"` (and for v2fly's with maxEarlyData 2048 and
earlyDataHeaderName Sec-WebSocket-Protocol): built from Debian's
gorilla/websocket, as Xray is, it takes `ed` out of the path, puts the first
local bytes base64url in Sec-WebSocket-Protocol and sends the rest as binary
messages. Debian's v2ray 4.34 predates earlyDataHeaderName (v2fly 4.39) and
sends no early data at all, whatever its wsSettings say: test_v2ray_client.py
covers what it sends.

    local TCP --> edclient ==TLS, WS + early data==> mtt-mu-server --> dst
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.gopeers import Peer, go_binary, start_download_source, stop_server

from tests.client_support import eventually
from tests.support import ServerProcess, pattern, running_server

pytestmark = pytest.mark.interop

MiB = 1 << 20
EARLY = 2048


async def logged(server: ServerProcess, text: str) -> None:
    """Assert the server logged text; its lines come through a pipe and a reader
    thread (a worker's through the supervisor too), so they may trail the reply."""
    with contextlib.suppress(TimeoutError):
        await eventually(lambda: text in server.log_text(), 10)
    assert text in server.log_text(), server.log_text()


@pytest.fixture(scope="module")
def edclient() -> Path:
    return go_binary("edclient")


@pytest.fixture
def server(tls_files: tuple[Path, Path]) -> Iterator[ServerProcess]:
    cert, key = tls_files
    with running_server("-cert", str(cert), "-key", str(key), "-verbose") as s:
        yield s


class Recorder:
    """A dst that echoes and keeps, per connection, everything it received."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                got += data
                writer.write(data)
                await writer.drain()
        writer.close()

    @property
    def addr(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    rec.server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
    try:
        yield rec
    finally:
        rec.server.close()


def events(peer: Peer) -> list[dict[str, Any]]:
    """edclient's report of each dial."""
    lines = peer.stderr_text().splitlines()
    return [json.loads(line.removeprefix("event ")) for line in lines if line.startswith("event ")]


def client(
    go_peer: Callable[[list[str]], tuple[Peer, str]],
    edclient: Path,
    server: ServerProcess,
    tls_files: tuple[Path, Path],
    path: str,
    *extra: str,
) -> tuple[Peer, str]:
    """edclient towards our server, SNI and Host tunnel.test, the test CA."""
    args = ["-s", server.tunnel, "-sni", "tunnel.test", "-wss", "-ca", str(tls_files[0])]
    return go_peer([str(edclient), *args, "-path", path, *extra])


async def open_local(addr: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = addr.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


@pytest.mark.parametrize("path", ["/ed?ed=2048", "/ed?x=1&ed=2048"])
async def test_early_bytes_arrive_first_and_everything_whole(
    go_peer: Any,
    edclient: Path,
    server: ServerProcess,
    tls_files: tuple[Path, Path],
    path: str,
) -> None:
    """The first 2048 bytes ride in the header, 4 MiB follow as messages; dst
    sees the early bytes first, the echo comes back intact; the 101 echoes
    the header; the path on the wire has lost its ed (and keeps the rest)."""
    payload = pattern(31, EARLY + 4 * MiB)
    async with recorder() as dst:
        server.add("/ed", dst.addr)
        peer, addr = client(go_peer, edclient, server, tls_files, path)
        reader, writer = await open_local(addr)
        writer.write(payload[:EARLY])
        await eventually(lambda: bool(events(peer)))  # dialed with what it had
        (opened,) = events(peer)
        assert opened["event"] == "open", opened
        assert opened["early"] == EARLY
        assert opened["echo"] == opened["sent"] != ""
        assert opened["path"] == path.replace("ed=2048", "").rstrip("?&")

        async def send() -> None:
            for i in range(EARLY, len(payload), 64 * 1024):
                writer.write(payload[i : i + 64 * 1024])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        back = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
        await sender
        writer.close()
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        (received,) = dst.received
        assert bytes(received[:EARLY]) == payload[:EARLY]
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    await logged(server, f"/ed: upgrade (plain, {EARLY} bytes of early data)")


async def test_a_request_in_the_header_alone_gets_its_download(
    go_peer: Any, edclient: Path, server: ServerProcess, tls_files: tuple[Path, Path]
) -> None:
    """8 bytes of early data and no frame at all: dst answers them with 2 MiB
    and their sha256."""
    size = 2 * MiB
    source, port = await start_download_source()
    try:
        server.add("/ed", f"127.0.0.1:{port}")
        peer, addr = client(go_peer, edclient, server, tls_files, "/ed?ed=2048")
        reader, writer = await open_local(addr)
        writer.write(size.to_bytes(8, "big"))
        body = await asyncio.wait_for(reader.readexactly(size), 60)
        digest = await asyncio.wait_for(reader.readexactly(32), 10)
        writer.close()
        assert hashlib.sha256(body).digest() == digest
        (opened,) = events(peer)
        assert (opened["event"], opened["early"]) == ("open", 8)
    finally:
        await stop_server(source)


async def test_early_data_over_the_bound_is_refused(
    go_peer: Any, edclient: Path, server: ServerProcess, tls_files: tuple[Path, Path]
) -> None:
    """ed=4096 and a 4096-byte first write: over the server's 3072-byte bound."""
    async with recorder() as dst:
        server.add("/ed", dst.addr)
        peer, addr = client(go_peer, edclient, server, tls_files, "/ed?ed=4096")
        reader, writer = await open_local(addr)
        writer.write(pattern(32, 4096))
        assert await asyncio.wait_for(reader.read(), 15) == b""  # closed, nothing relayed
        writer.close()
        (refused,) = events(peer)
        assert (refused["event"], refused["status"]) == ("refused", 400), refused
        await logged(server, "/ed: early data of 4096 bytes over the 3072-byte bound")
        assert dst.received == []


async def test_an_unknown_protocol_that_is_not_base64_is_ignored_as_before(
    go_peer: Any, edclient: Path, server: ServerProcess, tls_files: tuple[Path, Path]
) -> None:
    async with recorder() as dst:
        server.add("/ed", dst.addr)
        peer, addr = client(go_peer, edclient, server, tls_files, "/ed", "-protocol", "v1.chat")
        reader, writer = await open_local(addr)
        payload = pattern(33, 100_000)
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
        writer.close()
        (opened,) = events(peer)
        assert (opened["early"], opened["sent"], opened["echo"]) == (0, "v1.chat", "")
        assert dst.received[0] == payload
    await logged(server, "/ed: upgrade (plain) to")
