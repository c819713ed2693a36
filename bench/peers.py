"""The processes a benchmark runs: both relays, both clients, iperf3 and the echo dst.

Our server is started exactly as the integration tests start it
(tests/support.start_server: console script, free loopback ports); the Go relay
and the Go client are the interop tests' peers (harness/go). Each handle
stops its process with a bounded wait.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from harness.gopeers import Peer, go_binary, start_peer, stop_peer
from harness.server import ServerProcess, start_server

from bench.gobuild import bench_binary
from bench.procstat import is_listening
from mtt.transport.tls import self_signed_pem

SERVER_NAME = "tunnel.test"
TUNNEL_PATH = "/p"
IDLE_TIMEOUT = "5m0s"  # long enough for 10,000 held tunnels to stay open while measured
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class BenchError(RuntimeError):
    """A measurement could not be made (a peer died, a tool failed)."""


class Unavailable(BenchError):
    """Something optional (our Python client, -workers) is missing: skip, don't fail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(proc: subprocess.Popen[Any], port: int, timeout: float, what: str) -> None:
    """Poll /proc/net/tcp (no probe connection) until port listens; bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before listening")
        if is_listening(port):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after a bounded wait; reaps the child."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Certs:
    cert: Path
    key: Path


def make_certs(directory: Path) -> Certs:
    """One ECDSA P-256 certificate for SERVER_NAME, given to both relays (same TLS cost)."""
    cert_pem, key_pem = self_signed_pem(SERVER_NAME)
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    return Certs(cert, key)


# --------------------------------------------------------------------------- relays


class Relay(Protocol):
    """A tunnel server under test: ours or the Go relay."""

    label: str

    @property
    def addr(self) -> str: ...

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class ControlReply:
    status: int
    body: dict[str, Any]
    seconds: float


class OurRelay:
    """mtt-mu-server as a process; users come through its controller."""

    def __init__(self, server: ServerProcess, label: str) -> None:
        self.server = server
        self.label = label

    @property
    def addr(self) -> str:
        return self.server.tunnel

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def alive(self) -> bool:
        return self.server.proc.poll() is None

    def control(self, body: bytes, timeout: float = 60.0) -> ControlReply:
        """POST one controller command on a fresh connection, timed end to end."""
        host, port = self.server.controller.rsplit(":", 1)
        started = time.perf_counter()
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request("POST", "/", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        seconds = time.perf_counter() - started
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {"raw": raw[:200].decode(errors="replace")}
        return ControlReply(resp.status, doc, seconds)

    def add_users(self, users: list[tuple[str, str]]) -> ControlReply:
        return self.add_entries([{"path": p, "dst": d} for p, d in users])

    def add_entries(self, entries: list[dict[str, Any]]) -> ControlReply:
        """An add (opt 1) of these entries; in effect in every worker once it returns."""
        body = {"opt": 1, "args_bunch": entries}
        reply = self.control(json.dumps(body, separators=(",", ":")).encode())
        if reply.status != 200 or reply.body.get("res") != 1:
            raise BenchError(f"controller add failed: {reply.status} {reply.body}")
        return reply

    def log_has_traceback(self) -> bool:
        return "Traceback" in self.server.log_text()

    def stop(self) -> None:
        self.server.stop()


def start_ours(
    certs: Certs,
    dst: str,
    *extra: str,
    label: str = "ours",
    timeout: str = IDLE_TIMEOUT,
    env: dict[str, str] | None = None,
) -> OurRelay:
    """Our server with TLS from certs and user TUNNEL_PATH -> dst."""
    try:
        server = start_server(
            "-cert", str(certs.cert), "-key", str(certs.key), "-timeout", timeout, *extra, env=env
        )
    except RuntimeError as exc:
        raise BenchError(f"mtt-mu-server did not start: {exc}") from exc
    relay = OurRelay(server, label)
    try:
        relay.add_users([(TUNNEL_PATH, dst)])
    except Exception:
        relay.stop()
        raise
    return relay


def server_help() -> str:
    """`mtt-mu-server -h` output, to see which optional flags this build has."""
    exe = Path(sys.executable).parent / "mtt-mu-server"
    try:
        proc = subprocess.run(
            [str(exe), "-h"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout + proc.stderr


class GoRelay:
    """harness/go/gorelay: gorilla/websocket + xtaci/smux doing what our server does."""

    label = "Go relay"

    def __init__(self, proc: Peer, addr: str) -> None:
        self.proc = proc
        self._addr = addr

    @property
    def addr(self) -> str:
        return self._addr

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_peer(self.proc)


def start_gorelay(certs: Certs, dst: str, timeout: str = IDLE_TIMEOUT) -> GoRelay:
    args: list[str | os.PathLike[str]] = [
        go_binary("gorelay"),
        "-b",
        "127.0.0.1:0",
        "-cert",
        certs.cert,
        "-key",
        certs.key,
        "-route",
        f"{TUNNEL_PATH}={dst}",
        "-smux-version",
        "1",
        "-timeout",
        timeout,
    ]
    proc, addr = start_peer(args, timeout=START_TIMEOUT_S)
    return GoRelay(proc, addr)


# --------------------------------------------------------------------------- clients


class Client(Protocol):
    label: str
    port: int

    def alive(self) -> bool: ...

    def failure(self) -> str:
        """Why the process ended (the interesting line of its stderr)."""
        ...

    def stop(self) -> None: ...


def client_flags(server: str, mux: bool, max_stream: int) -> list[str]:
    flags = ["-s", server, "-n", SERVER_NAME, "-sv", "-wss-path", TUNNEL_PATH]
    if mux:
        flags += ["-mux", "-mux-max-stream", str(max_stream)]
    return flags


class GoClient:
    """harness/go/mttclient, the stand-in for the Go mtt-client (wss mode)."""

    label = "Go client"

    def __init__(self, server: str, mux: bool, max_stream: int = 4) -> None:
        self.proc, addr = start_peer(
            [go_binary("mttclient"), "-b", "127.0.0.1:0", *client_flags(server, mux, max_stream)],
            timeout=START_TIMEOUT_S,
        )
        self.port = int(addr.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failure(self) -> str:
        return _interesting(self.proc.stderr_text(), self.proc.returncode)

    def stop(self) -> None:
        stop_peer(self.proc)


def _interesting(stderr: str, code: int | None) -> str:
    """The panic or the last line of a dead peer's stderr, with its exit code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    panic = next((line for line in lines if line.startswith("panic:")), None)
    return f"exit {code}: {(panic or (lines[-1] if lines else 'no output'))[:200]}"


PY_CLIENT = Path(sys.executable).parent / "mtt-client"


class PyClient:
    """Our Python mtt-client (console script); Unavailable if missing or it will not start."""

    label = "Python client"

    def __init__(self, server: str, mux: bool, max_stream: int = 4) -> None:
        if not PY_CLIENT.exists():
            raise Unavailable(f"{PY_CLIENT} is missing")
        self.port = free_port()
        self.err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        argv = [str(PY_CLIENT), "-b", f"127.0.0.1:{self.port}", "-wss"]
        argv += client_flags(server, mux, max_stream)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.err,
        )
        try:
            wait_listening(self.proc, self.port, START_TIMEOUT_S, "mtt-client")
        except BenchError as exc:
            self.stop()
            raise Unavailable(f"{exc}: {self.stderr_tail()}") from exc

    def stderr_tail(self, limit: int = 600) -> str:
        self.err.seek(0)
        text = self.err.read().decode(errors="replace").strip()
        return text[-limit:] or "(no output)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failure(self) -> str:
        return _interesting(self.stderr_tail(4000), self.proc.returncode)

    def stop(self) -> None:
        stop_process(self.proc)
        self.err.close()


# --------------------------------------------------------------------------- dst servers


class IperfServer:
    """`iperf3 -s` as the user's dst; restarted on the same port after a failed test."""

    def __init__(self) -> None:
        exe = shutil.which("iperf3")
        if exe is None:
            raise BenchError("iperf3 not found (apt-get install iperf3)")
        self.exe = exe
        self.port = free_port()
        self.proc = self._spawn()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [self.exe, "-s", "-B", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(proc, self.port, START_TIMEOUT_S, "iperf3 -s")
        return proc

    def restart(self) -> None:
        stop_process(self.proc)
        self.proc = self._spawn()

    def stop(self) -> None:
        stop_process(self.proc)


class EchoDst:
    """bench/go/mttbench echo: a Go echo dst, cheap enough to serve 10,000 connections."""

    def __init__(self) -> None:
        self.proc, self.addr = start_peer(
            [bench_binary("mttbench"), "echo", "-b", "127.0.0.1:0"], timeout=START_TIMEOUT_S
        )

    def stop(self) -> None:
        stop_peer(self.proc)
