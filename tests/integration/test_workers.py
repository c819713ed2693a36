"""Several worker processes on one port with one coherent user table."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from harness.server import ServerProcess

from tests.integration.test_tunnel import echo_roundtrip, opener
from tests.support import echo_server, pattern, running_server, tagged_server


async def test_changes_reach_every_worker_before_the_reply(cert_files: tuple[Path, Path]) -> None:
    ctx = ssl.create_default_context(cafile=str(cert_files[0]))
    args = ("-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-workers", "2", "-verbose")
    with running_server(*args) as server:
        assert len(server.children()) == 2
        async with tagged_server(b"A") as a, tagged_server(b"B") as b:
            for round_, (dst, tag) in enumerate([(a, b"A"), (b, b"B")] * 3):
                server.add("/w", dst)  # reply 1: in effect everywhere, no sleep needed
                for _ in range(12):
                    async with opener(server, ctx, "/w") as ws:
                        assert await asyncio.wait_for(ws.recv(), 10) == tag, round_
            server.control({"opt": 2, "args_bunch": [{"path": "/w"}]})
            assert server.control({"opt": 9})[1]["current_users"] == 0
        served_by = set(re.findall(r" (w[12]) mtt\.server: \S+ /w: upgrade", server.log_text()))
        assert served_by == {"w1", "w2"}, "the kernel spreads connections over both workers"


async def test_ping_counts_users_once_and_changes_nothing(cert_files: tuple[Path, Path]) -> None:
    ctx = ssl.create_default_context(cafile=str(cert_files[0]))
    args = ("-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-workers", "2")
    with running_server(*args) as server:
        async with tagged_server(b"T") as dst:
            bunch = [{"path": f"/u{i}", "dst": dst} for i in range(1000)]
            server.control({"opt": 1, "args_bunch": bunch})
            for _ in range(3):  # panels ping every few seconds
                reply = server.control({"opt": 9})[1]
                assert reply == {
                    "res": 1,
                    "err_string": "",
                    "current_users": 1000,
                    "revision": 1,
                }
            # Every worker still routes every user (a ping once reset the workers).
            for i in range(16):
                async with opener(server, ctx, f"/u{i}") as ws:
                    assert await asyncio.wait_for(ws.recv(), 10) == b"T"


async def kill_a_worker_and_wait_for_its_successor(server: ServerProcess) -> None:
    """SIGKILL the first worker; return once the supervisor has two again."""
    victim = server.children()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        kids = server.children()
        if len(kids) == 2 and victim not in kids:
            break
        await asyncio.sleep(0.1)
    assert len(server.children()) == 2


async def test_a_dead_worker_is_replaced_with_the_full_table(cert_files: tuple[Path, Path]) -> None:
    ctx = ssl.create_default_context(cafile=str(cert_files[0]))
    args = ("-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-workers", "2")
    with running_server(*args) as server:
        async with echo_server() as echo:
            server.add("/live", echo.addr)
            async with opener(server, ctx, "/live") as ws:
                assert await echo_roundtrip(ws, b"x") == b"x"
                survivor = server.children()[1]
                await kill_a_worker_and_wait_for_its_successor(server)
                # Every new tunnel works, whichever worker takes it; the killed one
                # came back with /live in its table.
                for i in range(20):
                    async with opener(server, ctx, "/live") as other:
                        payload = pattern(i, 1000)
                        assert await echo_roundtrip(other, payload) == payload
            assert survivor in server.children()
        assert "exited with -9; restarting" in server.log_text()


def _resumptions(addr: str, count: int, version: ssl.TLSVersion) -> int:
    """Open `count` TLS connections one after another, each offering the session
    the one before got (a 404 each); how many resumed."""
    host, port = addr.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = version
    session, resumed = None, 0
    for _ in range(count):
        raw = socket.create_connection((host, int(port)), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="tunnel.test", session=session) as conn:
            conn.sendall(b"GET /nobody HTTP/1.1\r\nHost: tunnel.test\r\n\r\n")
            assert conn.recv(12) == b"HTTP/1.1 404"
            resumed += conn.session_reused
            session = conn.session
    return resumed


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_sessions_resume_on_every_worker_a_restarted_one_too(
    cert_files: tuple[Path, Path], version: ssl.TLSVersion
) -> None:
    # nginx's workers share one ticket key; with a key per worker a client that
    # lands on another worker pays a full handshake (about half of them).
    args = ("-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-workers", "2")
    with running_server(*args) as server:
        assert _resumptions(server.tunnel, 40, version) == 39
        served_by = set(
            re.findall(r" (w[12]) mtt\.server: \S+: no user for path", server.log_text())
        )
        assert served_by == {"w1", "w2"}, "the kernel spreads connections over both workers"
        await kill_a_worker_and_wait_for_its_successor(server)
        assert _resumptions(server.tunnel, 40, version) == 39
