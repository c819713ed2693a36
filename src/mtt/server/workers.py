"""Using every core: N worker processes share the tunnel port (SO_REUSEPORT),
one supervisor owns the controller and keeps every worker's user table in step.

A Python process runs on one core; a Go server uses them all. The kernel
spreads new connections over the workers' listening sockets. The supervisor
keeps the authoritative table: a controller change is sent to every worker
and the reply waits until each has applied it, so `res: 1` means in effect
everywhere. A worker that dies is restarted with a snapshot of the table
before it listens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import sys
from typing import Any

from mtt.config import ServerConfig
from mtt.controller.api import Command, Opt, apply_command
from mtt.errors import ProtocolError
from mtt.server import channel
from mtt.server.listen import tcp_listen_socket, unix_listen_socket
from mtt.server.store import command_to_wire, snapshot
from mtt.server.users import UserTable
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.workers")

APPLY_TIMEOUT = 60.0  # a worker that cannot apply a change in this long is restarted
START_TIMEOUT = 30.0
RESTART_DELAY = 1.0


def config_to_wire(config: ServerConfig) -> dict[str, Any]:
    """What a worker needs; the controller's token and policy stay with the supervisor."""
    data = dataclasses.asdict(config)
    del data["controller_token"], data["allow_dst"]
    return data


class Worker:
    """One worker process and its control channel."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = False
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[None]] = {}

    async def start(self, listen_sock: socket.socket, init: dict[str, Any]) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mtt.server.worker",
                str(self.index),
                str(listen_sock.fileno()),
                str(child.fileno()),
                pass_fds=(listen_sock.fileno(), child.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        self.reader, self.writer = await asyncio.open_unix_connection(sock=parent)
        self.writer.write(channel.encode(init))
        async with asyncio.timeout(START_TIMEOUT):
            message = await channel.read_message(self.reader)
        if message is None or not message.get("ready"):
            raise ProtocolError(f"worker {self.index} did not start: {message}")
        self.ready = True
        spawn(self._read_acks(), name=f"worker {self.index} acks")

    async def _read_acks(self) -> None:
        assert self.reader is not None
        try:
            while (message := await channel.read_message(self.reader)) is not None:
                future = self._waiting.pop(int(message.get("id", -1)), None)
                if future is not None and not future.done():
                    future.set_result(None)
        except (ProtocolError, ConnectionError, ValueError) as exc:
            log.error("worker %d: control channel: %s", self.index, exc)
        finally:
            self.ready = False
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("worker channel closed"))
            self._waiting.clear()

    async def request(self, body: bytes) -> None:
        """Send one change (a JSON object, encoded) and wait until the worker applied it."""
        if self.writer is None or not self.ready:
            raise ConnectionError(f"worker {self.index} is not running")
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self.writer.write(channel.encode_body(b'{"id":%d,' % request_id + body[1:]))
        await self.writer.drain()
        await future

    def stop(self, grace: float) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.write(channel.encode({"op": "stop", "grace": grace}))
                self.writer.close()
        self.ready = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


class WorkerPool:
    """The supervisor: spawns, feeds and restarts workers; a UserStore for the controller."""

    def __init__(self, config: ServerConfig, tls: dict[str, str] | None, count: int) -> None:
        self.config = config
        self.tls = tls
        self.table = UserTable()
        self.workers = [Worker(i + 1) for i in range(count)]
        self._placeholder: socket.socket | None = None
        self._shared: socket.socket | None = None
        self._port = 0
        self._stopping = False
        self._apply_lock = asyncio.Lock()

    # -- sockets ---------------------------------------------------------------

    def _listen_socket(self) -> socket.socket:
        """A fresh listening socket on the pool's port, sharing it via SO_REUSEPORT."""
        if self.config.bind_unix:
            if self._shared is None:
                self._shared = unix_listen_socket(self.config.bind)
            return self._shared
        host = self.config.bind.rsplit(":", 1)[0]
        return tcp_listen_socket(
            f"{host}:{self._port}", fast_open=self.config.fast_open, reuse_port=True
        )

    def bound_address(self) -> str:
        if self.config.bind_unix:
            return self.config.bind
        host = self.config.bind.rsplit(":", 1)[0]
        return f"{host}:{self._port}"

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> str:
        if not self.config.bind_unix:
            # SO_REUSEPORT would let us share a port with another running server
            # (same user): bind once without it, so a port in use is an error.
            probe = tcp_listen_socket(self.config.bind, listen=False)
            self._port = probe.getsockname()[1]
            host = self.config.bind.rsplit(":", 1)[0]
            probe.close()
            # Hold the port (bound, never listening) so a restarted worker gets it back.
            self._placeholder = tcp_listen_socket(
                f"{host}:{self._port}", reuse_port=True, listen=False
            )
        await asyncio.gather(*(self._start_worker(w) for w in self.workers))
        for worker in self.workers:
            spawn(self._watch(worker), name=f"watch worker {worker.index}")
        return self.bound_address()

    def _init_message(self) -> dict[str, Any]:
        return {
            "config": config_to_wire(self.config),
            "tls": self.tls,
            "users": command_to_wire(snapshot(self.table)),
        }

    async def _start_worker(self, worker: Worker) -> None:
        # Under the apply lock: no change can slip between the snapshot and "ready".
        async with self._apply_lock:
            sock = self._listen_socket()
            try:
                await worker.start(sock, self._init_message())
            finally:
                if sock is not self._shared:
                    sock.close()  # the worker has its own copy of the descriptor

    async def _watch(self, worker: Worker) -> None:
        """Restart a worker that exits while the pool is running."""
        while not self._stopping:
            assert worker.proc is not None
            code = await worker.proc.wait()
            worker.ready = False
            if self._stopping:
                return
            log.error("worker %d exited with %s; restarting", worker.index, code)
            await asyncio.sleep(RESTART_DELAY)
            try:
                await self._start_worker(worker)
            except (OSError, ProtocolError, TimeoutError) as exc:
                log.error("worker %d failed to restart: %s", worker.index, exc)

    async def stop(self, grace: float = 0.0) -> None:
        """Workers stop accepting, let tunnels finish for `grace` seconds, then exit."""
        self._stopping = True
        for worker in self.workers:
            worker.stop(grace)
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(grace + 15):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for worker in self.workers:
                worker.kill()
        for sock in (self._placeholder, self._shared):
            if sock is not None:
                sock.close()

    # -- UserStore ---------------------------------------------------------------

    def count(self) -> int:
        return len(self.table)

    async def apply(self, command: Command) -> None:
        """Apply here, then in every running worker; returns once all have it."""
        if command.opt is Opt.PING:
            return  # changes nothing (it once reached workers as a reset)
        async with self._apply_lock:
            apply_command(self.table, command)
            await self._broadcast(command_to_wire(command))

    async def reload_tls(self, tls: dict[str, str]) -> None:
        """Every worker (and any restarted later) serves the new certificate."""
        async with self._apply_lock:
            self.tls = tls
            await self._broadcast({"op": "tls", "tls": tls})

    async def _broadcast(self, message: dict[str, Any]) -> None:
        """Send to every running worker and wait for each to acknowledge."""
        # Encode once: json.dumps of 40,000 entries is the expensive part.
        body = json.dumps(message, separators=(",", ":")).encode()
        running = [w for w in self.workers if w.ready]
        results = await asyncio.gather(
            *(asyncio.wait_for(w.request(body), APPLY_TIMEOUT) for w in running),
            return_exceptions=True,
        )
        for worker, result in zip(running, results, strict=True):
            if isinstance(result, BaseException):
                # It restarts from a snapshot that already holds this change.
                log.error(
                    "worker %d failed to apply a change (%r); restarting it",
                    worker.index,
                    result,
                )
                worker.kill()
