"""Connections that stall before or during the TLS handshake: what they cost the
server in descriptors and memory, and that the memory comes back.

The server raises its soft RLIMIT_NOFILE to the hard limit (as the Go server
does), so a shell's 1024 does not cap it.
does), so a shell's 1024 does not cap it; a silent connection costs no TLS
engine until its first bytes arrive; and after a burst the C heap is trimmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import selectors
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.hostile_helpers import KiB, MiB, client_hello
from tests.integration.test_tunnel import echo_roundtrip, opener
from tests.support import ROOT, ServerProcess, echo_server, running_server

WAIT_S = 20.0  # bound on the server accepting, or closing, a batch of connections


def insecure() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def nofile_of(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a running process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as fh:
        for line in fh:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no open files line in /proc/{pid}/limits")


def accepted(server: ServerProcess) -> int:
    """Connections to the tunnel port that the server's processes have accepted
    (established, and a descriptor in the server: not waiting in the backlog)."""
    inodes: set[str] = set()
    for pid in [server.proc.pid, *server.children()]:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    port = f":{server.port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[1].endswith(port) and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def raise_own_nofile() -> int:
    """The hard limit this test process may hand a child (raising its own soft one to it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {WAIT_S:.0f} s"
        time.sleep(0.05)


@contextlib.contextmanager
def stalled(server: ServerProcess, count: int, hello: bytes | None = None) -> Iterator[None]:
    """count connections that the server has accepted and that then send nothing more
    (or only a ClientHello, whose answer they read and never reply to)."""
    before = accepted(server)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            socks.append(sock)
            if hello is not None:
                sock.sendall(hello)
        if hello is not None:
            answered = 0
            with selectors.DefaultSelector() as sel:
                for sock in socks:
                    sel.register(sock, selectors.EVENT_READ)
                deadline = time.monotonic() + WAIT_S
                while answered < count:
                    assert time.monotonic() < deadline, f"{count - answered} hellos unanswered"
                    for key, _ in sel.select(0.5):
                        sel.unregister(key.fileobj)
                        answered += 1
        wait_for(lambda: accepted(server) >= before + count, f"{count} accepted")
        yield
    finally:
        for sock in socks:
            sock.close()


def _mtt_pids(server: ServerProcess) -> list[int]:
    return [server.proc.pid, *server.children()]


@pytest.mark.slow
@pytest.mark.parametrize("hard", ["this process's", "fs.nr_open"])
def test_soft_nofile_limit_is_raised_to_the_hard_one(hard: str) -> None:
    """Started with soft 1024, supervisor and both workers run with soft = hard,
    and the start-up log says so."""
    if hard == "fs.nr_open":  # Linux's ceiling, 1048576 by default
        with open("/proc/sys/fs/nr_open") as fh:
            limit = int(fh.read())
    else:
        limit = raise_own_nofile()
    prefix = ("prlimit", f"--nofile=1024:{limit}")
    if subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode:
        pytest.skip(f"cannot give a child a hard limit of {limit} here (CAP_SYS_RESOURCE)")
    with running_server("-force-tls", "-workers", "2", prefix=prefix) as server:
        wait_for(lambda: len(server.children()) == 2, "two workers")
        limits = {pid: nofile_of(pid) for pid in _mtt_pids(server)}
        assert set(limits.values()) == {(limit, limit)}, limits
        text = server.log_text()
    assert f"open files limit raised from 1024 to {limit} (the hard limit)" in text, text


@pytest.mark.slow
@pytest.mark.serial  # its burst must be accepted within the handshake bound
async def test_new_tunnels_open_past_a_soft_limit_of_1024() -> None:
    """1,500 stalled connections on a server started with soft limit 1024: every
    new TLS tunnel still opens at once and echoes (on main, with the limit kept,
    they waited in the backlog until the stalled ones timed out)."""
    hard = raise_own_nofile()
    if hard < 4096:
        pytest.skip(f"the hard RLIMIT_NOFILE here is {hard}: too low for 1,500 connections")
    prefix = ("prlimit", f"--nofile=1024:{hard}")
    with running_server("-force-tls", "-workers", "1", prefix=prefix) as server:
        async with echo_server() as echo:
            server.add("/fd", echo.addr)
            with stalled(server, 1500):
                for i in range(5):
                    async with asyncio.timeout(5):
                        async with opener(server, insecure(), "/fd") as ws:
                            assert await echo_roundtrip(ws, bytes([i]) * 100) == bytes([i]) * 100
                # The tunnels opened while all 1,500 were held, not after a timeout.
                assert accepted(server) >= 1500


@pytest.mark.slow
@pytest.mark.serial  # its burst must be accepted within the handshake bound
def test_silent_connections_cost_no_tls_engine() -> None:
    """1,000 connections that send nothing: a few KiB each (a TLS layer made at
    accept cost 53 KiB each); closed, each gets one log line naming its peer."""
    with running_server("-force-tls", "-workers", "1") as server:
        with stalled(server, 32):  # warm-up: first-use costs out of the delta
            pass
        time.sleep(1)
        before = server.rss()
        with stalled(server, 1000):
            time.sleep(0.5)
            per_connection = (server.rss() - before) / 1000
        print(f"RSS per silent connection: {per_connection / KiB:.1f} KiB")
        assert per_connection < 16 * KiB
        wait_for(
            lambda: server.log_text().count("closed before a TLS ClientHello") >= 1032,
            "one line per connection logged",
        )
    line = re.search(r".*closed before a TLS ClientHello.*", server.log_text())
    assert line is not None and "127.0.0.1:" in line.group(0), line


@pytest.mark.slow
@pytest.mark.serial  # its burst must be accepted within the handshake bound
def test_rss_comes_back_after_a_burst_of_stalled_handshakes() -> None:
    """1,000 silent connections and 1,000 that stall after their ClientHello, then
    all close: RSS returns close to its level before (it tripled and stayed)."""
    with running_server("-force-tls", "-workers", "1") as server:
        hello = client_hello()
        with stalled(server, 32), stalled(server, 32, hello):
            pass
        time.sleep(3)
        before = server.rss()
        with stalled(server, 1000), stalled(server, 1000, hello):
            peak = server.rss()
        wait_for(lambda: accepted(server) == 0, "closed")
        deadline = time.monotonic() + 10
        while server.rss() > before * 1.25 and time.monotonic() < deadline:
            time.sleep(0.2)
        after = server.rss()
    print(f"RSS {before / MiB:.0f} -> {peak / MiB:.0f} -> {after / MiB:.0f} MiB")
    assert peak > before + 40 * MiB, "the burst cost nothing: the test proves nothing"
    assert after < before * 1.25, (before, peak, after)


def test_the_systemd_unit_keeps_python_objects_where_the_trim_reaches() -> None:
    """The unit runs the server with PYTHONMALLOC=malloc: pymalloc's arenas stay
    resident while a single object lives in them, glibc's freed pages the trim
    returns (RSS after a wave: +25 % with pymalloc, +10 % with malloc)."""
    unit = (ROOT / "deploy" / "mtt-mu-server.service").read_text()
    assert "Environment=PYTHONMALLOC=malloc" in unit.splitlines()
