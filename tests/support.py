"""Helpers shared by the integration and interop tests: the server under test
as a real process, and small dst servers with checksums."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"tunnel listener on (\S+) \(.*\), controller on ([^\s\"]+)")


def console_command(script: str, module: str) -> list[str]:
    """The installed console script, or `python -m module` where it is not installed."""
    exe = Path(sys.executable).parent / script
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def server_command() -> list[str]:
    return console_command("mtt-mu-server", "mtt.server.main")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """mtt-mu-server run to its end (for -h and for starts that must fail)."""
    return subprocess.run(
        [*server_command(), *args], check=False, capture_output=True, text=True, timeout=30
    )


@dataclass
class ServerProcess:
    """mtt-mu-server started from its console script, as users start it."""

    proc: subprocess.Popen[str]
    tunnel: str
    controller: str
    lines: list[str] = field(default_factory=list)

    token: str = ""

    def control(
        self,
        doc: Any,
        *,
        method: str = "POST",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Send one controller request; returns (HTTP status, reply JSON)."""
        body = raw if raw is not None else json.dumps(doc).encode()
        all_headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        all_headers.update(headers or {})
        if "/" in self.controller:
            conn: http.client.HTTPConnection = _UnixHTTPConnection(self.controller)
        else:
            host, port = self.controller.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, "/", body=body if method != "GET" else None, headers=all_headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def add(self, path: str, dst: str) -> None:
        status, reply = self.control({"opt": 1, "args_bunch": [{"path": path, "dst": dst}]})
        assert (status, reply["res"]) == (200, 1), reply

    def children(self) -> list[int]:
        """Pids of the worker processes."""
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        with open(path) as fh:
            return [int(pid) for pid in fh.read().split()]

    def rss(self) -> int:
        """Resident memory of the server and its workers, in bytes."""
        total = 0
        for pid in [self.proc.pid, *self.children()]:
            with open(f"/proc/{pid}/status") as fh:
                total += next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")) * 1024
        return total

    @property
    def port(self) -> int:
        return int(self.tunnel.rsplit(":", 1)[1])

    def log_text(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self._path)
        self.sock = sock


def start_server(
    *args: str,
    bind: str = "127.0.0.1:0",
    controller: str = "127.0.0.1:0",
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
) -> ServerProcess:
    """Start the server on free loopback ports and wait until it listens.

    prefix goes before the command (e.g. `prlimit --nofile=...`).
    """
    # Each test server keeps its own users unless a test names a store itself.
    store = () if {"-db", "-store"} & set(args) else ("-db", "memory")
    argv = [*prefix, *server_command(), "-b", bind, "-c", controller, *store, *args]
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), True)
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = _LISTENING.search(line)
        if match:
            server = ServerProcess(proc, match.group(1), match.group(2), lines)
            _drain_in_background(server)
            return server
    proc.kill()
    raise RuntimeError("server did not start:\n" + "".join(lines) + (proc.stderr.read() or ""))


def _drain_in_background(server: ServerProcess) -> None:
    import threading

    def pump() -> None:
        assert server.proc.stderr is not None
        for line in server.proc.stderr:
            server.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()


@contextlib.contextmanager
def running_server(*args: str, **kwargs: Any) -> Iterator[ServerProcess]:
    server = start_server(*args, **kwargs)
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"server exited with {code}:\n{server.log_text()}"
        assert "Traceback" not in server.log_text(), server.log_text()


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
