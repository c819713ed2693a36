"""Helpers shared by the integration and interop tests: small dst servers with
checksums, and (from harness.server) the server under test as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator

from harness.server import (
    ROOT,
    ServerProcess,
    console_command,
    run_cli,
    running_server,
    server_command,
    start_server,
)

from mtt.config import Limits

__all__ = [
    "ROOT",
    "EchoServer",
    "ServerProcess",
    "concurrent_adds",
    "console_command",
    "controller_limits",
    "echo_server",
    "pattern",
    "run_cli",
    "running_server",
    "server_command",
    "start_server",
    "tagged_server",
]


def concurrent_adds(
    servers: list[ServerProcess], threads: int = 8, each: int = 100
) -> tuple[int, list[int]]:
    """`threads` panels at once, thread i talking to servers[i % len(servers)],
    each sending `each` single-user opt 1 adds: the revision before, and the
    revision every reply named (all 200 res 1)."""
    from concurrent.futures import ThreadPoolExecutor

    status, reply = servers[0].control({"opt": 9})
    assert status == 200, reply
    start = int(reply["revision"])

    def panel(thread: int) -> list[int]:
        server = servers[thread % len(servers)]
        revisions = []
        for i in range(each):
            entry = {"path": f"/panel{thread}-{i}", "dst": f"127.0.0.1:{1000 + i}"}
            status, reply = server.control({"opt": 1, "args_bunch": [entry]})
            assert (status, reply["res"]) == (200, 1), reply
            revisions.append(int(reply["revision"]))
        return revisions

    with ThreadPoolExecutor(threads) as pool:
        return start, [r for revisions in pool.map(panel, range(threads)) for r in revisions]


def pattern(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes (sha256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


class EchoServer:
    """A TCP dst that echoes, counting its connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.open -= 1
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[EchoServer]:
    echo = EchoServer()
    echo.server = await asyncio.start_server(echo._handle, "127.0.0.1", 0)
    try:
        yield echo
    finally:
        echo.server.close()


@contextlib.asynccontextmanager
async def tagged_server(tag: bytes) -> AsyncIterator[str]:
    """A dst that sends `tag` and closes: tells which dst a tunnel reached."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(tag)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def controller_limits(**bounds: float) -> Limits:
    """The default Limits with some controller_* bounds changed (head_timeout=...)."""
    return dataclasses.replace(Limits(), **{f"controller_{k}": v for k, v in bounds.items()})
