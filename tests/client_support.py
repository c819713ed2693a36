"""mtt-client run as users run it (its console script), for the tests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import ROOT, ServerProcess, console_command, pattern

_LISTENING = re.compile(r"listening on (\S+)")


def client_command() -> list[str]:
    return console_command("mtt-client", "mtt.client.main")


@dataclass
class ClientProcess:
    """mtt-client started from its console script; stderr collected line by line."""

    proc: subprocess.Popen[str]
    addr: str
    lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.addr.rsplit(":", 1)
        return host.strip("[]"), int(port)

    def log_text(self) -> str:
        return "".join(self.lines)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    async def wait_for_log(self, text: str, count: int = 1, limit_s: float = 10.0) -> None:
        await eventually(lambda: self.log_text().count(text) >= count, limit_s)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.join()
        return self.proc.returncode

    def join(self) -> None:
        """After exit: wait until every line of stderr has been collected."""
        if self.pump is not None:
            self.pump.join(5)


async def eventually(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait (bounded) until predicate() holds; the peers are other processes."""
    async with asyncio.timeout(limit_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


def start_client(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20.0
) -> ClientProcess:
    """Start mtt-client on a free loopback port and wait for its `listening on` line."""
    argv = [*client_command(), "-b", "127.0.0.1:0", *args]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = _LISTENING.search(line)
        if match:
            client = ClientProcess(proc, match.group(1), lines)
            client.pump = threading.Thread(target=_pump, args=(client,), daemon=True)
            client.pump.start()
            return client
    proc.kill()
    proc.wait()
    raise RuntimeError("client did not start:\n" + "".join(lines))


def _pump(client: ClientProcess) -> None:
    assert client.proc.stderr is not None
    for line in client.proc.stderr:
        client.lines.append(line)


@contextlib.contextmanager
def running_client(*args: str, env: dict[str, str] | None = None) -> Iterator[ClientProcess]:
    client = start_client(*args, env=env)
    try:
        yield client
    finally:
        code = client.stop()
        assert code == 0, f"client exited with {code}:\n{client.log_text()}"
        assert "Traceback" not in client.log_text(), client.log_text()


def client_args(server: ServerProcess, path: str, *extra: str) -> list[str]:
    return [
        "-s",
        f"127.0.0.1:{server.port}",
        "-n",
        "tunnel.test",
        "-wss",
        "-wss-path",
        path,
        *extra,
    ]


def trust(cert_files: tuple[Path, Path]) -> dict[str, str]:
    return {"SSL_CERT_FILE": str(cert_files[0])}


async def echo_round_trip(client: ClientProcess, size: int, seed: int) -> bool:
    """Send `size` bytes through the client to an echo dst; True if they come back intact."""
    reader, writer = await asyncio.open_connection(*client.host_port)
    data = pattern(seed, size)

    async def send() -> None:
        writer.write(data)
        await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        got = await asyncio.wait_for(reader.readexactly(size), 30)
        await asyncio.wait_for(sender, 10)
    finally:
        writer.close()
    return hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
