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
import logging
import socket
import sys
from typing import Any, TypeVar

from mtt.address import format_hostport
from mtt.config import ServerConfig
from mtt.core.commands import Command
from mtt.errors import ProtocolError
from mtt.service.user_service import UserService
from mtt.transport.listen import tcp_listen_socket, unix_listen_socket
from mtt.transport.tasks import spawn
from mtt.workers import channel
from mtt.workers.messages import (
    Admission,
    Admit,
    Budgets,
    Challenges,
    Change,
    Collect,
    Exhausted,
    Final,
    Grant,
    Init,
    Kick,
    Ready,
    Release,
    ReloadTls,
    Reply,
    Request,
    Stop,
    Tokens,
    decode,
)
from mtt.workers.rpc import Handlers, RpcChannel, encode_request

log = logging.getLogger("mtt.workers")
R = TypeVar("R", bound=Reply)


class Worker:
    """One worker process and its control channel."""

    def __init__(self, index: int, service: UserService) -> None:
        self.index = index
        self.service = service
        self.proc: asyncio.subprocess.Process | None = None
        self.rpc: RpcChannel | None = None
        self.channel_task: asyncio.Task[None] | None = None
        self.ready = False
        # The worker's questions to the user service.
        self.handlers: Handlers = {
            Admit: self._admit,
            Tokens: self._tokens,
            Release: self._release,
            Exhausted: self._exhausted,
            Final: self._final,
        }
        self.answered = 0.0  # loop time of its last reply to a collection

    async def start(self, listen_sock: socket.socket, init: Init, ready_within: float) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mtt.workers.worker",
                str(self.index),
                str(listen_sock.fileno()),
                str(child.fileno()),
                pass_fds=(listen_sock.fileno(), child.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        connection = await channel.connect(parent)
        connection.send(channel.encode(init.to_wire()))
        try:
            async with asyncio.timeout(ready_within):
                data = await connection.first()
            if data is None or not isinstance(decode(data), Ready):
                raise ProtocolError(f"worker {self.index} did not start: {data}")
        except BaseException:
            connection.close()
            raise
        self.rpc = RpcChannel(connection, self.handlers, f"worker {self.index}")
        self.answered = asyncio.get_running_loop().time()
        self.ready = True
        self.channel_task = spawn(self._run(self.rpc), name=f"worker {self.index} channel")

    async def _run(self, rpc: RpcChannel) -> None:
        try:
            await rpc.run()
        finally:
            self.ready = False
            self.service.agent_gone(self.index)

    async def _admit(self, message: Admit) -> Admission:
        verdict = await self.service.admit(self.index, message.path, message.ip)
        return Admission(verdict.refused, verdict.quota_left)

    async def _tokens(self, message: Tokens) -> Grant:
        return Grant(await self.service.tokens(message.path, message.direction, message.want))

    def _release(self, message: Release) -> None:
        spawn(
            self.service.release(self.index, message.path, message.ip, message.usage),
            name=f"release {message.path}",
        )

    def _exhausted(self, message: Exhausted) -> None:
        spawn(
            self.service.exhausted(message.path, message.closed, message.unreported),
            name=f"quota of {message.path}",
        )

    def _final(self, message: Final) -> None:
        self.service.absorb(message.report)

    async def request(self, request: Request[R], body: bytes) -> R:
        """Send one request, already encoded as body, and wait for the worker's reply."""
        if self.rpc is None or not self.ready:
            raise ConnectionError(f"worker {self.index} is not running")
        return await self.rpc.call_encoded(request, body)

    def stop(self, grace: float) -> None:
        """Ask the worker to drain and exit; its final report still comes in."""
        if self.rpc is not None:
            self.rpc.notify(Stop(grace))
        self.ready = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


class WorkerPool:
    """The supervisor: spawns, feeds and restarts workers; the user service's data plane."""

    def __init__(
        self,
        config: ServerConfig,
        tls: dict[str, str] | None,
        count: int,
        service: UserService,
    ) -> None:
        self.config = config
        self.tls = tls
        self.challenges: dict[str, dict[str, str]] = {}
        self.service = service
        self.workers = [Worker(i + 1, service) for i in range(count)]
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
            format_hostport(host, self._port), fast_open=self.config.fast_open, reuse_port=True
        )

    def bound_address(self) -> str:
        if self.config.bind_unix:
            return self.config.bind
        host = self.config.bind.rsplit(":", 1)[0]
        return format_hostport(host, self._port)

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
                format_hostport(host, self._port), reuse_port=True, listen=False
            )
        await asyncio.gather(*(self._start_worker(w) for w in self.workers))
        for worker in self.workers:
            spawn(self._watch(worker), name=f"watch worker {worker.index}")
        return self.bound_address()

    def _init_message(self) -> Init:
        return Init(self.config, self.tls, self.service.snapshot(), self.challenges)

    async def _start_worker(self, worker: Worker) -> None:
        # Under the apply lock: no change can slip between the snapshot and "ready".
        async with self._apply_lock:
            if self._stopping:
                return
            sock = self._listen_socket()
            try:
                await worker.start(
                    sock, self._init_message(), self.config.limits.worker_start_timeout
                )
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
            await asyncio.sleep(self.config.limits.worker_restart_delay)
            if self._stopping:
                return
            try:
                await self._start_worker(worker)
            except (OSError, ProtocolError, TimeoutError) as exc:
                log.error("worker %d failed to restart: %s", worker.index, exc)

    async def stop(self, grace: float = 0.0) -> None:
        """Workers stop accepting, let tunnels finish for `grace` seconds, then exit."""
        self._stopping = True
        # A restart in progress finishes first (it holds the lock), so the
        # worker it starts is told to stop too rather than waited for in vain.
        async with self._apply_lock:
            for worker in self.workers:
                worker.stop(grace)
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(grace + self.config.limits.worker_exit_margin):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for worker in self.workers:
                worker.kill()
        # Their final reports are read before the channels end.
        channels = [w.channel_task for w in self.workers if w.channel_task is not None]
        if channels:
            await asyncio.wait(channels, timeout=self.config.limits.worker_final_report_wait)
        for worker in self.workers:
            if worker.rpc is not None:
                worker.rpc.close()
        for sock in (self._placeholder, self._shared):
            if sock is not None:
                sock.close()

    # -- Plane -----------------------------------------------------------------------

    async def apply(self, command: Command, kick: bool) -> None:
        """Apply in every running worker; returns once all have it."""
        async with self._apply_lock:
            await self._broadcast(Change(command, kick))

    async def collect(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        reports = []
        for worker, reply in await self._send_all(Collect()):
            if not isinstance(reply, BaseException):
                worker.answered = now
                reports.append(reply.report)
        return reports

    async def kick(self, paths: tuple[str, ...], why: str | None = None) -> int:
        replies = await self._ask_all(Kick(paths, why))
        return sum(r.kicked for r in replies)

    def grant(self, budgets: dict[str, int]) -> None:
        """Hand every worker the quota its users have left (one message each)."""
        message = Budgets(budgets)
        for worker in self.workers:
            if worker.ready and worker.rpc is not None:
                worker.rpc.notify(message)

    def unready(self, now: float, max_silence: float) -> bool:
        """True while a worker is not running, or has not answered a collection
        for max_silence seconds (stuck, or restarting)."""
        return any(not w.ready or now - w.answered > max_silence for w in self.workers)

    async def _ask_all(self, request: Request[R]) -> list[R]:
        """A question to every running worker; a worker that fails to answer is skipped."""
        return [r for _, r in await self._send_all(request) if not isinstance(r, BaseException)]

    async def _send_all(self, request: Request[R]) -> list[tuple[Worker, R | BaseException]]:
        """Send to every running worker; each one's reply, or why there is none."""
        # Encode once: json.dumps of 40,000 entries is the expensive part.
        body = encode_request(request)
        running = [w for w in self.workers if w.ready]
        results = await asyncio.gather(
            *(
                asyncio.wait_for(w.request(request, body), self.config.limits.worker_apply_timeout)
                for w in running
            ),
            return_exceptions=True,
        )
        return list(zip(running, results, strict=True))

    async def reload_tls(self, tls: dict[str, str]) -> None:
        """Every worker (and any restarted later) serves the new certificate."""
        async with self._apply_lock:
            self.tls = tls
            await self._broadcast(ReloadTls(tls))

    async def set_challenges(self, challenges: dict[str, dict[str, str]]) -> None:
        """Every worker (and any restarted later) serves these TLS-ALPN-01 challenges;
        returns once all running ones do, so the CA may be told to validate."""
        async with self._apply_lock:
            self.challenges = challenges
            await self._broadcast(Challenges(challenges))

    async def _broadcast(self, request: Request[Any]) -> None:
        """Send to every running worker and wait for each to acknowledge."""
        for worker, result in await self._send_all(request):
            if isinstance(result, BaseException):
                # It restarts from a snapshot that already holds this change.
                log.error(
                    "worker %d failed to apply a change (%r); restarting it",
                    worker.index,
                    result,
                )
                worker.kill()
