"""mtt-client: the Go client's flags (and SIP003 plugin mode), then serve until a signal.

Start scripts written for the Go mtt-client keep working: the same flag
names, types and defaults, and its flags that mean nothing here (`-wss`,
`-fallback-dns`, `-V`) are accepted with a warning. Started by a shadowsocks
client (SIP003), the addresses come from SS_LOCAL_* / SS_REMOTE_* and the
options from SS_PLUGIN_OPTIONS, which override the command line as in Go.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import uvloop

from mtt.address import format_hostport, parse_destination
from mtt.cli import FlagSet, run_cli
from mtt.client import ClientConfig, ClientLimits, sip003
from mtt.client.dialer import Dialer
from mtt.client.mux import MuxLocalStream, MuxPool
from mtt.client.plain import PlainClientTunnel, Tunnels
from mtt.errors import ConfigError
from mtt.smux import SmuxConfig
from mtt.transport.dst import DstConnection
from mtt.transport.listen import tcp_listen_socket

log = logging.getLogger("mtt.client")

PROGRAM = "mtt-client"
# ClientConfig's defaults are the Go client's: the flags take theirs from it.
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ClientConfig)}
GO_DEFAULTS: dict[str, Any] = {
    "b": "",
    "s": "",
    "wss": False,
    "wss-path": "/",
    "n": "",
    "sv": False,
    "mux": False,
    "mux-max-stream": _CONFIG_DEFAULTS["mux_max_stream"],
    "timeout": _CONFIG_DEFAULTS["idle_timeout"],
    "fast-open": False,
    "fallback-dns": "",
    "verbose": False,
    "V": False,
    "vpn": False,
}


def build_flags(defaults: Mapping[str, Any] | None = None) -> FlagSet:
    """The Go mtt-client's flags; `defaults` replaces Go's (for layering SIP003 options)."""
    d = {**GO_DEFAULTS, **(defaults or {})}
    fs = FlagSet(PROGRAM)
    fs.add("b", "string", d["b"], "[Host:Port] Bind address, e.g. '127.0.0.1:1080'")
    fs.add("s", "string", d["s"], "[Host:Port] Server address")
    fs.add("wss", "bool", d["wss"], "Enable WebSocket Secure protocol (always on)")
    fs.add("wss-path", "string", d["wss-path"], "WebSocket path")
    fs.add(
        "n",
        "string",
        d["n"],
        "Server name. Use to verify the hostname and to support virtual hosting.",
    )
    fs.add(
        "sv",
        "bool",
        d["sv"],
        "Skip verify. Client won't verify the server's certificate chain and host name.",
    )
    fs.add("mux", "bool", d["mux"], "Enable multiplex")
    fs.add(
        "mux-max-stream",
        "int",
        d["mux-max-stream"],
        "The max number of multiplexed streams in one true TCP connection, 1-16",
    )
    fs.add("timeout", "duration", d["timeout"], "The idle timeout for connections")
    fs.add("fast-open", "bool", d["fast-open"], "(Linux kernel 4.11+ only) Enable TCP fast open")
    fs.add("fallback-dns", "string", d["fallback-dns"], "Accepted for compatibility, ignored")
    fs.add("verbose", "bool", d["verbose"], "more log")
    fs.add("V", "bool", d["V"], "Android VPN mode (SIP003); accepted, ignored")
    fs.add("vpn", "bool", d["vpn"], "Same as -V; accepted, ignored")
    return fs


def apply_plugin_options(
    values: dict[str, Any], options: Sequence[tuple[str, str | None]], warnings: list[str]
) -> dict[str, Any]:
    """Layer SS_PLUGIN_OPTIONS over values; unknown names are skipped with a warning."""
    flags = build_flags(values)
    argv: list[str] = []
    for key, value in options:
        name = key.lstrip("-")
        flag = flags.flags.get(name)
        if flag is None:
            warnings.append(f"ignoring unknown plugin option {key!r}")
            continue
        if value is None:
            if flag.kind != "bool":
                raise ConfigError(f"SS_PLUGIN_OPTIONS: option {name} needs a value ({name}=...)")
            argv.append(f"-{name}")
        else:
            argv.append(f"-{name}={value}")
    try:
        return flags.parse(argv)
    except ConfigError as exc:
        raise ConfigError(f"SS_PLUGIN_OPTIONS: {exc}") from None


def resolve_config(
    values: dict[str, Any], environ: Mapping[str, str]
) -> tuple[ClientConfig, list[str]]:
    """Flags plus SIP003 environment -> config and the warnings to log; ConfigError."""
    warnings: list[str] = []
    plugin = sip003.plugin_env(environ)
    if plugin is not None:
        values = {**values, "b": plugin.local, "s": plugin.remote}
        values = apply_plugin_options(values, plugin.options, warnings)
    return config_from_flags(values, warnings), warnings


def config_from_flags(values: Mapping[str, Any], warnings: list[str]) -> ClientConfig:
    """Check the flag values together; raise ConfigError with the reason."""
    bind = values["b"]
    if not bind:
        raise ConfigError("need a bind address (-b)")
    try:
        parse_destination(bind, allow_empty_host=True)
    except ValueError as exc:
        raise ConfigError(f"bad bind address -b {bind!r}: {exc}") from None
    if not values["s"]:
        raise ConfigError("need a server address (-s)")
    try:
        server = parse_destination(values["s"])
    except ValueError as exc:
        raise ConfigError(f"bad server address -s {values['s']!r}: {exc}") from None
    max_stream = values["mux-max-stream"]
    max_streams = SmuxConfig().max_streams  # what the server accepts per session
    if not 1 <= max_stream <= max_streams:
        raise ConfigError(f"-mux-max-stream must be 1..{max_streams}, not {max_stream}")
    timeout = values["timeout"]
    if timeout <= 0:
        raise ConfigError("-timeout must be positive")
    path = values["wss-path"]
    if not path.startswith("/"):
        path = "/" + path
    if not values["wss"]:
        warnings.append("-wss not given: WebSocket over TLS is the only transport, using it")
    if values["fallback-dns"]:
        warnings.append("-fallback-dns is ignored: the system resolver is used")
    if values["V"] or values["vpn"]:
        warnings.append("-V (Android VPN mode) is ignored")
    return ClientConfig(
        bind=bind,
        server=server,
        server_name=values["n"] or server.host,
        path=path,
        mux=values["mux"],
        mux_max_stream=max_stream,
        insecure=values["sv"],
        idle_timeout=timeout,
        fast_open=values["fast-open"],
        verbose=values["verbose"],
        limits=ClientLimits(),
    )


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # picows logs every connection at INFO: too much even for -verbose.
    for noisy in ("mtt.ws", "picows"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.INFO if verbose else logging.WARNING)


class Client:
    """The local listener's connections, each handed to a tunnel or a pooled stream."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.dialer = Dialer(config)
        self.tunnels = Tunnels()
        self.pool = MuxPool(config, self.dialer) if config.mux else None

    def new_connection(self) -> DstConnection:
        """The protocol of an accepted local connection (TCP_NODELAY, bounded buffer)."""
        owner: MuxLocalStream | PlainClientTunnel
        if self.pool is not None:
            owner = MuxLocalStream(self.pool, self.tunnels)
        else:
            owner = PlainClientTunnel(self.config, self.dialer, self.tunnels)
        return DstConnection(owner, self.config.limits.write_high_water)


async def serve(config: ClientConfig, ready: Callable[[str], None] | None = None) -> None:
    """Accept local connections until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    client = Client(config)
    sock = tcp_listen_socket(config.bind, fast_open=config.fast_open)
    server = await loop.create_server(client.new_connection, sock=sock)
    host, port = sock.getsockname()[:2]
    where = format_hostport(host, port)
    mode = f"smux, up to {config.mux_max_stream} streams a session" if config.mux else "plain"
    # The handlers come before the "listening on" line: whoever waits for that line
    # (a plugin host, a supervisor, the tests) may signal the moment it appears.
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "listening on %s (to %s as %s, %s)", where, client.dialer.target, config.server_name, mode
    )
    if ready is not None:
        ready(where)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        server.close()
        client.tunnels.shutdown()
        # Let the close frames and FINs reach the sockets, briefly; then drop the rest.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.tunnels.all_closed.wait(), config.limits.shutdown_linger)
        client.tunnels.abort()


def _start(values: dict[str, Any], environ: Mapping[str, str]) -> int:
    config, warnings = resolve_config(values, environ)
    setup_logging(config.verbose)
    if sip003.plugin_env(environ) is not None:
        log.info("running as a SIP003 plugin")
    for warning in warnings:
        log.warning("%s", warning)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(config))
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    flags = build_flags()
    try:
        in_plugin_mode = sip003.plugin_env(env) is not None
    except ConfigError as exc:
        sys.stderr.write(f"{PROGRAM}: {exc}\n")
        return 1
    if in_plugin_mode and args:
        # A plugin host may pass its own arguments (ss-android: -V); Go ignores what
        # it does not know there, and so do we.
        try:
            flags.parse(args)
        except ConfigError as exc:
            sys.stderr.write(f"{PROGRAM}: ignoring the command line in SIP003 mode: {exc}\n")
            args = []
    return run_cli(flags, args, lambda values: _start(values, env))


if __name__ == "__main__":
    sys.exit(main())
