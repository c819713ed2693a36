"""Faults the server must ride out: running out of file descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest
from websockets.asyncio.client import ClientConnection

from tests.integration.test_tunnel import echo_roundtrip, opener
from tests.support import echo_server, running_server


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.mark.slow
async def test_fd_limit_reached_then_recovers() -> None:
    """With 96 descriptors, 80 tunnels (160 fds) cannot all open; the server
    keeps running, and once they close it accepts again."""
    with running_server(
        "-force-tls", "-workers", "1", prefix=("prlimit", "--nofile=96:96")
    ) as server:
        async with echo_server() as echo:
            server.add("/fd", echo.addr)
            opened: list[ClientConnection] = []
            failures = 0

            async def one() -> None:
                nonlocal failures
                try:
                    ws = await asyncio.wait_for(opener(server, insecure(), "/fd").__aenter__(), 15)
                    assert await asyncio.wait_for(echo_roundtrip(ws, b"x"), 15) == b"x"
                    opened.append(ws)
                except Exception:
                    failures += 1

            for _ in range(80):  # one at a time, keeping each open
                await one()
            assert failures > 0, "the limit was never reached: the test proves nothing"
            assert len(opened) > 10
            for ws in opened:
                with contextlib.suppress(Exception):
                    await ws.close()
            await asyncio.sleep(1)
            for i in range(10):
                async with opener(server, insecure(), "/fd") as ws:
                    assert await echo_roundtrip(ws, bytes([i])) == bytes([i])
        assert server.proc.poll() is None
