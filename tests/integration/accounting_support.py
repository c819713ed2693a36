"""Helpers for the accounting and limit tests (issue 7): a dst that checksums
and timestamps what it receives, plain-WebSocket openers (optionally from
another loopback address), and the controller calls the tests repeat."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.support import ServerProcess, pattern, running_server

KiB = 1024
MiB = 1024 * KiB

# Both layouts: the service in the tunnel process, or in a supervisor that
# workers reach over RPC.
LAYOUTS = [
    pytest.param(("-workers", "2"), id="workers2"),
    pytest.param(("-workers", "1"), id="workers1"),
]


@contextlib.contextmanager
def layout_server(layout: tuple[str, ...], *args: str) -> Iterator[ServerProcess]:
    with running_server(*layout, "-timeout", "1m", *args) as server:
        yield server


@dataclass
class ProbeConn:
    """One connection at the probe: what arrived, when, and its checksum."""

    received: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    samples: list[tuple[float, int]] = field(default_factory=list)
    sent: int = 0
    closed: bool = False
    first: bytes = b""  # the first byte: which client this is

    def bytes_between(self, start: float, end: float) -> int:
        return sum(n for t, n in self.samples if start <= t < end)


class Probe:
    """A dst that reads everything (checksummed, timestamped) and, on each
    connection, sends `download` pattern bytes, or floods while `flood`."""

    def __init__(self, download: int = 0, flood: bool = False, seed: int = 7) -> None:
        self.download = download
        self.flood = flood
        self.seed = seed
        self.conns: list[ProbeConn] = []
        self.server: asyncio.Server | None = None

    @property
    def addr(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ProbeConn()
        self.conns.append(conn)
        sender = asyncio.ensure_future(self._send(writer, conn))
        try:
            while data := await reader.read(256 * KiB):
                if not conn.received:
                    conn.first = data[:1]
                conn.received += len(data)
                conn.digest.update(data)
                conn.samples.append((time.monotonic(), len(data)))
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # cancelled: the test is over (asyncio would log the cancellation)
        finally:
            conn.closed = True
            sender.cancel()
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, conn: ProbeConn) -> None:
        try:
            if self.download:
                data = pattern(self.seed, self.download)
                for i in range(0, len(data), 64 * KiB):
                    writer.write(data[i : i + 64 * KiB])
                    conn.sent += len(data[i : i + 64 * KiB])
                    await writer.drain()
            while self.flood:
                chunk = b"\xa5" * (64 * KiB)
                writer.write(chunk)
                conn.sent += len(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass


@contextlib.asynccontextmanager
async def probe_server(download: int = 0, flood: bool = False) -> AsyncIterator[Probe]:
    probe = Probe(download, flood)
    probe.server = await asyncio.start_server(probe._handle, "127.0.0.1", 0)
    try:
        yield probe
    finally:
        probe.server.close()


def ws_open(
    server: ServerProcess, path: str, *, mux: bool = False, from_ip: str | None = None
) -> connect:
    """A plain WebSocket tunnel (or smux session), optionally from another loopback address."""
    extra: dict[str, Any] = {"local_addr": (from_ip, 0)} if from_ip else {}
    return connect(
        f"ws://tunnel.test:{server.port}{path}",
        host="127.0.0.1",
        port=server.port,
        subprotocols=["smux_on" if mux else "smux_off"],  # type: ignore[list-item]
        max_size=None,
        compression=None,
        open_timeout=10,
        **extra,
    )


async def refused_status(server: ServerProcess, path: str, from_ip: str | None = None) -> int:
    """The HTTP status of an upgrade that must fail."""
    with pytest.raises(InvalidStatus) as info:
        async with ws_open(server, path, from_ip=from_ip):
            pass
    return info.value.response.status_code


async def upload(ws: ClientConnection, data: bytes, chunk: int = 64 * KiB) -> None:
    for i in range(0, len(data), chunk):
        await ws.send(data[i : i + chunk])


async def receive(ws: ClientConnection, size: int, limit_s: float = 30) -> bytes:
    got = bytearray()
    async with asyncio.timeout(limit_s):
        while len(got) < size:
            got += await ws.recv()  # type: ignore[operator]
    return bytes(got)


async def until(predicate: Callable[[], bool], limit_s: float = 15) -> None:
    """Wait until predicate() holds, rechecked every 20 ms."""
    async with asyncio.timeout(limit_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


def ok(server: ServerProcess, doc: dict[str, Any]) -> dict[str, Any]:
    status, reply = server.control(doc)
    assert (status, reply["res"]) == (200, 1), reply
    return reply


def add(server: ServerProcess, path: str, dst: str, **fields: int) -> dict[str, Any]:
    return ok(server, {"opt": 1, "args_bunch": [{"path": path, "dst": dst, **fields}]})


def listing(server: ServerProcess, *paths: str, reset: bool = False) -> dict[str, dict[str, Any]]:
    doc: dict[str, Any] = {"opt": 5}
    if paths:
        doc["args_bunch"] = [{"path": p} for p in paths]
    if reset:
        doc["reset"] = True
    return {u["path"]: u for u in ok(server, doc)["users"]}


async def wait_active(server: ServerProcess, path: str, active: int, limit_s: float = 15) -> None:
    """Wait until list shows `active` open tunnels for path (not a blind sleep)."""
    async with asyncio.timeout(limit_s):
        while True:
            entry = (await asyncio.to_thread(listing, server, path))[path]
            if entry["active_tunnels"] == active:
                return
            await asyncio.sleep(0.05)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
