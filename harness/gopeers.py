"""Go peers (built from harness/go/*) and the asyncio dst servers they talk to.

The Go programs are faithful stand-ins for the Go mos-tls-tunnel programs:

- ``mttclient``: the Go ``mtt-client`` in wss mode (with its hazards, see its source).
- ``wsload``: a load/check driver that talks WebSocket (+ smux) to a server directly.
- ``gorelay``: a Go server doing what ``mtt-mu-server`` does (also the benchmark baseline).

They are built in GOPATH mode against Debian's packages (golang-go,
golang-github-gorilla-websocket-dev, golang-github-xtaci-smux-dev). A missing ``go``
or a failed build raises RuntimeError: interop tests fail loudly, they never skip.

dst protocols used with ``wsload -pattern`` (documented in go/wsload/main.go too):

- echo: every byte read is written back.
- upload: client sends u64 big-endian length L, then L bytes; dst answers with the
  32-byte raw sha256 of those L bytes.
- download: client sends u64 big-endian length N; dst sends N pseudo-random bytes,
  then the 32-byte raw sha256 of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import random
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

PEERS_DIR = pathlib.Path(__file__).resolve().parent
GO_SRC_DIR = PEERS_DIR / "go"
BUILD_DIR = PEERS_DIR / ".build"
GOPATH = "/usr/share/gocode"

BUILD_TIMEOUT_S = 600.0
LISTEN_TIMEOUT_S = 15.0
MAX_LENGTH_PREFIX = 1 << 30  # dst servers refuse length prefixes above 1 GiB
CHUNK = 64 * 1024

_thread_lock = threading.Lock()


# --------------------------------------------------------------------------- build


def _source_digest(src_dir: pathlib.Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        h.update(path.relative_to(src_dir).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",
        GOPATH=GOPATH,
        GOFLAGS="-mod=mod",
        GOCACHE=str(BUILD_DIR / "gocache"),
        GOPROXY="off",
        GOTOOLCHAIN="local",
    )
    if "CGO_ENABLED" not in os.environ and shutil.which("gcc") is None:
        # Without a C compiler, go must rebuild std without cgo (~15 s once, cached).
        env["CGO_ENABLED"] = "0"
    return env


@contextlib.contextmanager
def _file_lock(path: pathlib.Path, timeout: float) -> Iterator[None]:
    """An flock shared with other processes (e.g. pytest-xdist workers), bounded wait."""
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out waiting for build lock {path}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def go_binary(name: str, src_root: pathlib.Path | None = None) -> pathlib.Path:
    """Build <src_root>/<name> (default harness/go; the benchmarks pass bench/go),
    cached by a hash of its sources; return the binary."""
    src = (src_root or GO_SRC_DIR) / name
    if not (src / "main.go").is_file():
        raise RuntimeError(f"no Go program at {src}")
    out = BUILD_DIR / f"{name}-{_source_digest(src)}"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            "`go` not found on PATH: the interop tests need golang-go, "
            "golang-github-gorilla-websocket-dev and golang-github-xtaci-smux-dev"
        )
    with _thread_lock:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        with _file_lock(BUILD_DIR / f"{name}.lock", BUILD_TIMEOUT_S):
            if out.is_file():
                return out
            tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
            try:
                proc = subprocess.run(
                    [go, "build", "-o", str(tmp), "."],
                    cwd=src,
                    env=_go_env(),
                    capture_output=True,
                    text=True,
                    timeout=BUILD_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"go build {name} timed out after {BUILD_TIMEOUT_S}s") from e
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(
                    f"go build {name} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
                )
            os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- processes


class Peer(subprocess.Popen[bytes]):
    """A running Go peer; its stderr goes to a temporary file readable with stderr_text()."""

    stderr_file: IO[bytes]

    def stderr_text(self) -> str:
        self.stderr_file.flush()
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode(errors="replace")


def start_peer(
    args: Sequence[str | os.PathLike[str]], timeout: float = LISTEN_TIMEOUT_S
) -> tuple[Peer, str]:
    """Start a Go peer and wait (bounded) for its ``listening <addr>`` line.

    Returns the process and the address it listens on. On failure the process is
    killed and RuntimeError carries its stderr.
    """
    err_file = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the Peer for its lifetime
    proc = Peer(
        [os.fspath(a) for a in args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=err_file,
        bufsize=0,
    )
    proc.stderr_file = err_file
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                stop_peer(proc)
                raise RuntimeError(
                    f"{args[0]} did not print 'listening' within {timeout}s; "
                    f"stderr:\n{proc.stderr_text()}"
                )
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                stop_peer(proc)
                raise RuntimeError(
                    f"{args[0]} exited (rc={proc.returncode}) before listening; "
                    f"stderr:\n{proc.stderr_text()}"
                )
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode(errors="replace").strip()
    if not line.startswith("listening "):
        stop_peer(proc)
        raise RuntimeError(f"{args[0]} printed {line!r} instead of 'listening <addr>'")
    return proc, line.removeprefix("listening ").strip()


def stop_peer(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Kill a peer (idempotent) and reap it, bounded."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def running_peer(
    args: Sequence[str | os.PathLike[str]], timeout: float = LISTEN_TIMEOUT_S
) -> Iterator[tuple[Peer, str]]:
    """start_peer as a context manager that always kills the peer on exit."""
    proc, addr = start_peer(args, timeout)
    try:
        yield proc, addr
    finally:
        stop_peer(proc)


async def run_wsload(args: Sequence[str], limit_s: float = 60.0) -> dict[str, Any]:
    """Run wsload with ``args`` without blocking the event loop; return its JSON result.

    The dict gets an extra ``returncode`` and ``stderr``. A hang is killed after
    ``limit_s`` seconds and raises TimeoutError.
    """
    proc = await asyncio.create_subprocess_exec(
        str(go_binary("wsload")),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 5)
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)
    text = out.decode(errors="replace").strip()
    try:
        result: dict[str, Any] = json.loads(text.splitlines()[-1])
    except (IndexError, ValueError):
        result = {"ok": False, "errors": [f"no JSON on stdout: {text!r}"]}
    result["returncode"] = proc.returncode
    result["stderr"] = err.decode(errors="replace")
    return result


# --------------------------------------------------------------------------- dst servers

_clients: dict[int, set[asyncio.StreamWriter]] = {}


async def _start(handler: Any) -> tuple[asyncio.Server, int]:
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    _clients[id(server)] = writers
    port: int = server.sockets[0].getsockname()[1]
    return server, port


async def stop_server(server: asyncio.Server, limit_s: float = 5.0) -> None:
    """Close a dst server and abort its open connections, bounded."""
    server.close()
    for w in list(_clients.pop(id(server), ())):
        w.transport.abort()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), limit_s)


async def _drain_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(CHUNK):
        pass


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()


async def _read_length(reader: asyncio.StreamReader) -> int:
    n = int.from_bytes(await reader.readexactly(8), "big")
    if n > MAX_LENGTH_PREFIX:
        raise ValueError(f"length prefix {n} above {MAX_LENGTH_PREFIX}")
    return n


async def _upload_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    left = await _read_length(reader)
    h = hashlib.sha256()
    while left:
        data = await reader.read(min(left, CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        h.update(data)
        left -= len(data)
    writer.write(h.digest())
    await writer.drain()
    await _drain_until_eof(reader)


async def _download_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    left = await _read_length(reader)
    rng = random.Random(left)
    h = hashlib.sha256()
    while left:
        data = rng.randbytes(min(left, CHUNK))
        h.update(data)
        writer.write(data)
        await writer.drain()
        left -= len(data)
    writer.write(h.digest())
    await writer.drain()
    await _drain_until_eof(reader)


async def start_echo_server() -> tuple[asyncio.Server, int]:
    """An echo dst on 127.0.0.1:<port>."""
    return await _start(_echo)


async def start_upload_sink() -> tuple[asyncio.Server, int]:
    """The upload dst: u64 BE length L, L bytes -> 32-byte sha256 of them."""
    return await _start(_upload_sink)


async def start_download_source() -> tuple[asyncio.Server, int]:
    """The download dst: u64 BE length N -> N pseudo-random bytes, then their sha256."""
    return await _start(_download_source)
