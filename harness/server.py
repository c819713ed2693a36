"""The server under test as a real process, started from its console script
as users start it; shared by the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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
    # Tunnels a test leaves open get 2 s at its stop, not the default 10 s; a test
    # that is about the grace period gives its own -grace (the last one counts).
    argv = [*prefix, *server_command(), "-b", bind, "-c", controller, *store, "-grace", "2s", *args]
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
