"""A worker process: serves tunnels on the listening socket it was handed and
applies the user-table changes its supervisor sends (mtt.workers.supervisor)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys

import uvloop

from mtt.accept.fallback import Fallback
from mtt.accept.tls_setup import tls_context
from mtt.accept.tunnel_server import TunnelServer
from mtt.core.admission import Verdict
from mtt.core.rate import Direction
from mtt.core.usage import Usage
from mtt.errors import ConfigError, ProtocolError
from mtt.logs import log_loop_errors, setup_logging
from mtt.service.agent import Agent
from mtt.transport.tasks import spawn
from mtt.wire.client_address import TrustedProxies
from mtt.wire.origin import OriginPolicy
from mtt.workers import channel
from mtt.workers.heap import trim_after_bursts
from mtt.workers.messages import (
    Admit,
    Budgets,
    Challenges,
    Change,
    Collect,
    Done,
    Exhausted,
    Final,
    Init,
    Kick,
    Kicked,
    Ready,
    Release,
    ReloadTls,
    Report,
    Stop,
    Tokens,
    decode,
)
from mtt.workers.rlimit import describe, raise_nofile
from mtt.workers.rpc import Handlers, RpcChannel

log = logging.getLogger("mtt.worker")


class SupervisorLink:
    """The agent's way to the user service in the supervisor."""

    def __init__(self) -> None:
        self.rpc: RpcChannel | None = None

    async def admit(self, path: str, ip: str) -> Verdict:
        assert self.rpc is not None
        reply = await self.rpc.call(Admit(path, ip))
        return Verdict(reply.refused, reply.quota_left)

    def release(self, path: str, ip: str, delta: Usage) -> None:
        assert self.rpc is not None
        self.rpc.notify(Release(path, ip, delta))

    async def tokens(self, path: str, direction: Direction, want: int) -> int:
        assert self.rpc is not None
        return (await self.rpc.call(Tokens(path, direction, want))).grant

    def exhausted(self, path: str, closed: int, unreported: int) -> None:
        assert self.rpc is not None
        self.rpc.notify(Exhausted(path, closed, unreported))


class WorkerControl:
    """Answers the supervisor: changes, counters, kicks, certificates, stop."""

    def __init__(self, agent: Agent, server: TunnelServer) -> None:
        self.agent = agent
        self.server = server
        self.stop_grace: float | None = None
        self.stopped = asyncio.Event()
        self.handlers: Handlers = {
            Change: self._change,
            Collect: self._collect,
            Kick: self._kick,
            Budgets: self._budgets,
            ReloadTls: self._reload_tls,
            Challenges: self._challenges,
            Stop: self._stop,
        }

    def _change(self, message: Change) -> Done:
        self.agent.apply(message.command, message.kick)
        return Done()

    def _collect(self, message: Collect) -> Report:
        return Report(self.agent.collect())

    def _kick(self, message: Kick) -> Kicked:
        return Kicked(self.agent.kick(message.paths, message.why))

    def _budgets(self, message: Budgets) -> None:
        self.agent.grant(message.left)

    def _reload_tls(self, message: ReloadTls) -> Done:
        try:
            self.server.reload_tls(message.tls)
        except ConfigError as exc:
            log.error("certificate reload failed: %s", exc)
        return Done()

    def _challenges(self, message: Challenges) -> Done:
        try:
            self.server.set_challenges(message.challenges)
        except ConfigError as exc:
            log.error("TLS-ALPN-01 challenge certificates not loaded: %s", exc)
        return Done()

    def _stop(self, message: Stop) -> None:
        self.stop_grace = message.grace
        self.stopped.set()


async def run(index: int, listen_fd: int, control_fd: int) -> None:
    listen_sock = socket.socket(fileno=listen_fd)
    connection = await channel.connect(socket.socket(fileno=control_fd))
    data = await connection.first()
    if data is None:
        return
    init = decode(data)
    if not isinstance(init, Init):
        raise ProtocolError(f"{init.OP!r} before init")
    config = init.config
    setup_logging(config.verbose, tag=f"w{index}", json_format=config.log_json)
    log_loop_errors(asyncio.get_running_loop())
    # inherited from the supervisor: normally a no-op
    before, now, error = raise_nofile(config.limits.nofile_unlimited_cap)
    if error is not None or now != before:
        (log.warning if error else log.info)("%s", describe(before, now, error))
    trimming = spawn(trim_after_bursts(config.limits), name="heap trim")
    link = SupervisorLink()
    agent = Agent(link, config.limits.expire_horizon)
    agent.apply(init.users, kick=False)
    server = TunnelServer(
        agent,
        config.limits,
        default_mux=config.mux_protocol,
        ssl_context=tls_context(init.tls),
        fallback=Fallback.parse(config.fallback) if config.fallback else None,
        trusted=TrustedProxies(config.trusted_proxies),
        proxy_protocol=config.proxy_protocol,
        origins=OriginPolicy(config.allowed_origins),
    )
    if init.challenges:
        server.set_challenges(init.challenges)
    await server.start(listen_sock)
    control = WorkerControl(agent, server)
    link.rpc = rpc = RpcChannel(connection, control.handlers, f"worker {index}")
    connection.send(channel.encode(Ready().to_wire()))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    reading = spawn(rpc.run(), name="read the supervisor's channel")
    stopped = spawn(stop.wait(), name="wait for SIGTERM")
    told = spawn(control.stopped.wait(), name="wait for the supervisor's stop")
    await asyncio.wait((reading, stopped, told), return_when=asyncio.FIRST_COMPLETED)
    # Told to stop: take the grace given; the supervisor gone without a word: none.
    grace = control.stop_grace or 0.0
    for task in (stopped, told):
        task.cancel()
    # The channel stays up while tunnels drain: their counts still go to the
    # supervisor, and the last of them in one final report.
    await server.drain(grace)
    trimming.cancel()
    rpc.notify(Final(agent.collect()))
    with contextlib.suppress(ConnectionError):
        await rpc.drain()
    reading.cancel()
    rpc.close()


def main() -> None:
    index, listen_fd, control_fd = (int(arg) for arg in sys.argv[1:4])
    # Ctrl-C reaches the whole process group; the supervisor decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run(index, listen_fd, control_fd))


if __name__ == "__main__":
    main()
