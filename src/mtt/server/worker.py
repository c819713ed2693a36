"""A worker process: serves tunnels on the listening socket it was handed and
applies the user-table changes its supervisor sends (mtt.server.workers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from typing import Any

import uvloop

from mtt.config import Limits, ServerConfig
from mtt.controller.api import apply_command
from mtt.errors import ConfigError
from mtt.logs import log_loop_errors, setup_logging
from mtt.server import channel
from mtt.server.client_address import TrustedProxies
from mtt.server.fallback import Fallback
from mtt.server.store import command_from_wire
from mtt.server.tls_setup import tls_context
from mtt.server.tunnel_server import TunnelServer
from mtt.server.users import UserTable
from mtt.smux import SmuxConfig

log = logging.getLogger("mtt.worker")


def config_from_wire(data: dict[str, Any]) -> ServerConfig:
    limits = dict(data["limits"])
    limits["smux"] = SmuxConfig(**limits["smux"])
    trusted = tuple(data.get("trusted_proxies", ()))  # a JSON list on the wire
    return ServerConfig(**{**data, "limits": Limits(**limits), "trusted_proxies": trusted})


async def run(index: int, listen_fd: int, control_fd: int) -> None:
    listen_sock = socket.socket(fileno=listen_fd)
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=control_fd))
    init = await channel.read_message(reader)
    if init is None:
        return
    config = config_from_wire(init["config"])
    setup_logging(config.verbose, tag=f"w{index}", json_format=config.log_json)
    log_loop_errors(asyncio.get_running_loop())
    table = UserTable()
    apply_command(table, command_from_wire(init["users"]))
    server = TunnelServer(
        table,
        config.limits,
        default_mux=config.mux,
        ssl_context=tls_context(init["tls"]),
        fallback=Fallback.parse(config.fallback) if config.fallback else None,
        trusted=TrustedProxies(config.trusted_proxies),
        proxy_protocol=config.proxy_protocol,
    )
    await server.start(listen_sock)
    writer.write(channel.encode({"ready": True}))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    reading = asyncio.ensure_future(_apply_changes(reader, writer, table, server))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait((reading, stopped), return_when=asyncio.FIRST_COMPLETED)
    grace = reading.result() if reading.done() and not reading.exception() else 0.0
    for task in (reading, stopped):
        task.cancel()
    await server.drain(grace)


async def _apply_changes(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    table: UserTable,
    server: TunnelServer,
) -> float:
    """Apply each change, then acknowledge it. Returns the grace period to stop
    with (0 when the supervisor went away without a word)."""
    while (message := await channel.read_message(reader)) is not None:
        op = message.get("op")
        if op == "stop":
            return float(message.get("grace", 0.0))
        if op == "tls":
            try:
                server.reload_tls(message["tls"])
            except ConfigError as exc:
                log.error("certificate reload failed: %s", exc)
        else:
            apply_command(table, command_from_wire(message))
        writer.write(channel.encode({"id": message["id"]}))
    return 0.0


def main() -> None:
    index, listen_fd, control_fd = (int(arg) for arg in sys.argv[1:4])
    # Ctrl-C reaches the whole process group; the supervisor decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run(index, listen_fd, control_fd))


if __name__ == "__main__":
    main()
