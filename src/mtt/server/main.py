"""mtt-mu-server: flags as the Go server takes them, then serve until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import uvloop

from mtt.accept.fallback import Fallback
from mtt.accept.tls_setup import new_ticket_keys, resolve_tls, tls_context, with_ticket_keys
from mtt.accept.tunnel_server import TunnelServer
from mtt.address import format_hostport
from mtt.autocert.http01 import Http01Listener
from mtt.autocert.manager import CertManager
from mtt.autocert.state import acme_root
from mtt.cli import FlagSet, run_cli
from mtt.config import Limits, ServerConfig
from mtt.controller.health import Readiness
from mtt.controller.http import (
    TOKEN_ENV,
    ControllerSettings,
    check_exposure,
    start_controller,
)
from mtt.core.leases import WhenDown
from mtt.core.policy import DstPolicy, parse_rule
from mtt.core.users import MuxProtocol
from mtt.errors import ConfigError, StoreError
from mtt.logs import log_loop_errors, setup_logging
from mtt.muxcool import MuxCoolConfig
from mtt.service.agent import Agent
from mtt.service.planes import LocalLink, LocalPlane
from mtt.service.user_service import UserService
from mtt.store.factory import default_db_path, open_store
from mtt.transport.listen import tcp_listen_socket, unix_listen_socket
from mtt.transport.tasks import spawn
from mtt.wire.acme import domain_problem
from mtt.wire.client_address import TrustedProxies
from mtt.wire.origin import OriginPolicy
from mtt.workers.heap import trim_after_bursts
from mtt.workers.rlimit import describe, raise_nofile
from mtt.workers.supervisor import WorkerPool

log = logging.getLogger("mtt.server")

DEFAULT_BIND = "127.0.0.1:8443"
DEFAULT_CONTROLLER = "127.0.0.1:8080"
# The flags' defaults for what ServerConfig and Limits also default: theirs, kept once.
_DEFAULTS = ServerConfig()
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


def build_flags() -> FlagSet:
    """The Go mtt-mu-server's flags (same names, types and defaults) plus ours."""
    fs = FlagSet("mtt-mu-server")
    fs.add("b", "string", DEFAULT_BIND, "[Host:Port] or [Path](if bind-unix) Server bind address")
    fs.add("bind-unix", "bool", False, "Bind on a Unix domain socket")
    fs.add("c", "string", DEFAULT_CONTROLLER, "[Host:Port] Controller address")
    fs.add("mux", "bool", False, "Enable multiplex when the client names no sub-protocol")
    fs.add(
        "mux-protocol",
        "string",
        "",
        "What a client that names no sub-protocol speaks: smux, mux.cool (v2ray-plugin's"
        " default mux=1) or none; default: smux with -mux, else none",
    )
    fs.add("timeout", "duration", _DEFAULTS.limits.idle_timeout, "The idle timeout for connections")
    fs.add("cert", "string", "", "[Path] X509KeyPair cert file")
    fs.add("key", "string", "", "[Path] X509KeyPair key file")
    fs.add("force-tls", "bool", False, "Serve TLS with a self-signed certificate if no -cert/-key")
    fs.add("disable-tls", "bool", False, "Serve plain HTTP even if -cert/-key are given")
    fs.add("n", "string", "", "Server name for the self-signed certificate")
    fs.add("fast-open", "bool", False, "(Linux kernel 4.11+ only) Enable TCP fast open")
    fs.add("verbose", "bool", False, "Log every connection")
    fs.add("c-token", "string", "", f"Bearer token the controller requires (or ${TOKEN_ENV})")
    fs.add(
        "c-insecure", "bool", False, "Allow a controller reachable from the network without a token"
    )
    fs.add(
        "allow-dst",
        "string",
        [],
        "Allowed user destinations: CIDR[:port[-port]] (repeatable); default: any",
        repeatable=True,
    )
    fs.add(
        "dial-timeout",
        "duration",
        _DEFAULTS.limits.connect_timeout,
        "Timeout for connecting to a user's dst",
    )
    fs.add(
        "grace",
        "duration",
        _DEFAULTS.grace,
        "On SIGTERM/SIGINT, time given to open tunnels to finish",
    )
    fs.add("log-format", "string", "text", "Log format: text or json")
    fs.add(
        "fallback",
        "string",
        "",
        "Relay every non-tunnel request to this site (http[s]://host[:port]) instead of a 404",
    )
    fs.add(
        "kick-on-delete",
        "bool",
        False,
        "Deleting users (opt 2, 3, 4) also closes their established tunnels",
    )
    fs.add(
        "metrics-per-user",
        "bool",
        False,
        "GET /metrics also gives series per user (labelled by path: keep the scrape private)",
    )
    fs.add(
        "db",
        "string",
        default_db_path(),
        "SQLite file keeping users and counters across restarts, one server per file;"
        " or 'memory' (lost on exit)",
    )
    fs.add(
        "store",
        "string",
        "",
        "redis://[:password@]host:port/db (rediss:// for TLS): users shared by several nodes",
    )
    fs.add(
        "flush-interval",
        "duration",
        _DEFAULTS.flush_interval,
        "How often traffic counters are written to the store (and on shutdown)",
    )
    fs.add(
        "redis-limits-when-down",
        "string",
        _DEFAULTS.limits_when_down.value,
        "With -store: admission of users with max_tunnels or max_ips while Redis does not"
        " answer: open (this node's own count) or closed (refused)",
    )
    fs.add(
        "trusted-proxy",
        "string",
        [],
        "Take the client address from X-Forwarded-For/X-Real-IP (and PROXY headers)"
        " only from peers in this CIDR, or unix: (repeatable)",
        repeatable=True,
    )
    fs.add(
        "allow-origin",
        "string",
        [],
        "With it, a browser's upgrade must come from this origin (scheme://host[:port],"
        " repeatable); requests without Origin pass; default: any origin",
        repeatable=True,
    )
    fs.add(
        "proxy-protocol",
        "bool",
        False,
        "Every connection starts with a PROXY protocol v1/v2 header (nginx, haproxy in front)",
    )
    fs.add(
        "workers",
        "int",
        os.cpu_count() or 1,
        "Worker processes sharing the port (SO_REUSEPORT); 1 serves in-process",
    )
    fs.add(
        "acme",
        "string",
        [],
        "Get and renew the certificate from an ACME CA for this DNS name (repeatable;"
        " TLS-ALPN-01 on the tunnel port)",
        repeatable=True,
    )
    fs.add("acme-email", "string", "", "Contact address of the ACME account (expiry notices)")
    fs.add("acme-directory", "string", LETS_ENCRYPT, "ACME directory URL of the CA")
    fs.add(
        "acme-http",
        "string",
        "",
        "[Host:Port] also answer HTTP-01 on this listener (e.g. :80), preferred over TLS-ALPN-01",
    )
    fs.add(
        "acme-ca-bundle",
        "string",
        "",
        "[Path] PEM roots trusted for the ACME directory's HTTPS (a private ACME CA)",
    )
    return fs


def acme_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The -acme flags, checked against each other and the TLS flags."""
    domains: list[str] = []
    for raw in values["acme"]:
        name = raw.strip().lower().rstrip(".")
        problem = domain_problem(name)
        if problem is not None:
            raise ConfigError(f"-acme {raw!r}: {problem}")
        if name not in domains:
            domains.append(name)
    others = [f"-{f}" for f in ("acme-email", "acme-http", "acme-ca-bundle") if values[f]]
    if not domains:
        if others:
            raise ConfigError(f"{others[0]} needs -acme")
        return {}
    if values["cert"]:
        raise ConfigError("-acme gets the certificate itself: give it or -cert/-key, not both")
    if values["disable-tls"]:
        raise ConfigError("-acme needs TLS: drop -disable-tls")
    if values["bind-unix"]:
        raise ConfigError("-acme needs a TCP tunnel port the CA can reach, not -bind-unix")
    email = values["acme-email"]
    if email and (email.count("@") != 1 or email.startswith("@") or email.endswith("@")):
        raise ConfigError(f"-acme-email {email!r}: not a mail address")
    directory = values["acme-directory"]
    if not directory.startswith("https://"):
        raise ConfigError(f"-acme-directory {directory!r}: must be an https:// URL")
    bundle = values["acme-ca-bundle"]
    if bundle and not os.access(bundle, os.R_OK):
        raise ConfigError(f"-acme-ca-bundle {bundle}: cannot read it")
    return {
        "acme_domains": tuple(domains),
        "acme_email": email,
        "acme_directory": directory,
        "acme_http": values["acme-http"],
        "acme_ca_bundle": os.path.abspath(bundle) if bundle else "",
        "acme_dir": acme_root(values["db"]),
    }


def config_from_flags(values: dict[str, Any]) -> ServerConfig:
    """Check the flag values together; raise ConfigError with the reason."""
    timeout = values["timeout"]
    if timeout <= 0:
        raise ConfigError("-timeout must be positive")
    if values["fallback"]:
        Fallback.parse(values["fallback"])
    if values["log-format"] not in ("text", "json"):
        raise ConfigError("-log-format must be text or json")
    if values["grace"] < 0:
        raise ConfigError("-grace must not be negative")
    if values["flush-interval"] <= 0:
        raise ConfigError("-flush-interval must be positive")
    if values["dial-timeout"] <= 0:
        raise ConfigError("-dial-timeout must be positive")
    token = values["c-token"] or os.environ.get(TOKEN_ENV, "")
    check_exposure(values["c"], token, values["c-insecure"])
    policy = DstPolicy(tuple(parse_rule(rule) for rule in values["allow-dst"]))
    TrustedProxies(values["trusted-proxy"])  # raises ConfigError naming a bad CIDR
    origins = OriginPolicy(values["allow-origin"])  # raises ConfigError naming a bad origin
    if not 1 <= values["workers"] <= 256:
        raise ConfigError("-workers must be from 1 to 256")
    if bool(values["cert"]) != bool(values["key"]):
        raise ConfigError("-cert and -key must be given together")
    mux_protocol = mux_protocol_from(values["mux"], values["mux-protocol"])
    when_down = values["redis-limits-when-down"]
    if when_down not in tuple(WhenDown):
        raise ConfigError(f"-redis-limits-when-down must be open or closed, not {when_down!r}")
    acme = acme_settings(values)
    return ServerConfig(
        bind=values["b"],
        bind_unix=values["bind-unix"],
        controller=values["c"],
        mux_protocol=mux_protocol,
        cert=values["cert"],
        key=values["key"],
        force_tls=values["force-tls"],
        disable_tls=values["disable-tls"],
        server_name=values["n"],
        fast_open=values["fast-open"],
        verbose=values["verbose"],
        workers=values["workers"],
        kick_on_delete=values["kick-on-delete"],
        metrics_per_user=values["metrics-per-user"],
        db=values["db"],
        store=values["store"],
        flush_interval=values["flush-interval"],
        limits_when_down=WhenDown(when_down),
        grace=values["grace"],
        log_json=values["log-format"] == "json",
        fallback=values["fallback"],
        controller_token=token,
        allow_dst=policy,
        trusted_proxies=tuple(values["trusted-proxy"]),
        allowed_origins=tuple(sorted(origins.allowed)),
        proxy_protocol=values["proxy-protocol"],
        limits=Limits(
            idle_timeout=timeout,
            connect_timeout=values["dial-timeout"],
            muxcool=MuxCoolConfig(idle_timeout=timeout),
        ),
        **acme,
    )


def mux_protocol_from(mux: bool, name: str) -> MuxProtocol:
    """-mux-protocol, or -mux as the Go server had it (smux or nothing)."""
    if not name:
        return MuxProtocol.SMUX if mux else MuxProtocol.NONE
    try:
        protocol = MuxProtocol(name)
    except ValueError:
        choices = ", ".join(p.value for p in MuxProtocol)
        raise ConfigError(f"-mux-protocol must be one of {choices}, not {name!r}") from None
    if mux and protocol is not MuxProtocol.SMUX:
        raise ConfigError(f"-mux means -mux-protocol smux, not {name}: give one of them")
    return protocol


async def serve(config: ServerConfig, nofile: str = "") -> None:
    """Run the tunnel listener(s) and the controller until SIGINT or SIGTERM."""
    log_loop_errors(asyncio.get_running_loop())
    trimming = spawn(trim_after_bursts(config.limits), name="heap trim")
    tls, mode = resolve_tls(config)
    tickets = new_ticket_keys()  # every worker's, and kept across certificate reloads
    tls = with_ticket_keys(tls, tickets) if tls is not None else None

    async def install_tls(spec: dict[str, str]) -> None:
        """An ACME certificate for every process serving the port (pool or server,
        both made below, before the manager runs)."""
        if config.workers > 1:
            await pool.reload_tls(with_ticket_keys(spec, tickets))
        else:
            server.reload_tls(spec)

    async def set_challenges(specs: dict[str, dict[str, str]]) -> None:
        if config.workers > 1:
            await pool.set_challenges(specs)
        else:
            server.set_challenges(specs)

    acme: CertManager | None = None
    http01: Http01Listener | None = None
    if config.acme_domains:
        if config.acme_http:
            http01 = Http01Listener(config.limits)
        acme = CertManager(
            config,
            install_tls,
            set_challenges,
            http01,
        )
        kept = acme.prepare()
        if kept is not None:
            tls, mode = kept, f"TLS with the ACME certificate for {', '.join(config.acme_domains)}"
    service = UserService(
        await open_store(config),
        kick_on_delete=config.kick_on_delete,
        limits=config.limits,
        when_down=config.limits_when_down,
    )
    try:
        await service.start()
    except StoreError as exc:  # no table to serve: say so in one line (systemd retries)
        raise ConfigError(f"cannot load the users: {exc}") from None
    readiness = Readiness(checks=[("store", service.store.reachable)])
    where_users = "Redis" if config.store else config.db  # a Redis URL may hold a password
    log.info("users: %d from %s, revision %d", service.count(), where_users, service.revision)
    if config.workers > 1:
        pool = WorkerPool(config, tls, config.workers, service)
        try:
            where = await pool.start()
        except BaseException:
            await pool.stop()
            raise
        service.attach(pool)
        mode += f", {config.workers} workers"
        max_silence = config.limits.worker_answer_max_age
        loop = asyncio.get_running_loop()
        readiness.checks.append(("workers", lambda: not pool.unready(loop.time(), max_silence)))
    else:
        sock = (
            unix_listen_socket(config.bind)
            if config.bind_unix
            else tcp_listen_socket(config.bind, fast_open=config.fast_open)
        )
        agent = Agent(LocalLink(service), config.limits.expire_horizon)
        agent.apply(service.snapshot(), kick=False)
        server = TunnelServer(
            agent,
            config.limits,
            default_mux=config.mux_protocol,
            ssl_context=tls_context(tls),
            fallback=Fallback.parse(config.fallback) if config.fallback else None,
            trusted=TrustedProxies(config.trusted_proxies),
            proxy_protocol=config.proxy_protocol,
            origins=OriginPolicy(config.allowed_origins),
        )
        await server.start(sock)
        bound = sock.getsockname()
        where = bound if isinstance(bound, str) else format_hostport(bound[0], bound[1])
        service.attach(LocalPlane(agent))
        readiness.checks.append(("listener", server.serving))
    try:
        if http01 is not None:  # before the controller: a port in use stops the start
            await http01.start(tcp_listen_socket(config.acme_http))
        runner, controller_at = await start_controller(
            config.controller,
            service,
            ControllerSettings(
                token=config.controller_token,
                policy=config.allow_dst,
                metrics_per_user=config.metrics_per_user,
                limits=config.limits,
            ),
            readiness,
        )
    except ConfigError:
        if http01 is not None:
            http01.close()
        await (pool.stop() if config.workers > 1 else asyncio.sleep(0))
        raise

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def reload_tls(why: str) -> None:
        try:
            spec, _ = resolve_tls(config)
        except ConfigError as exc:
            log.error("certificate reload (%s) failed, keeping the old one: %s", why, exc)
            return
        if spec is None:
            return
        if config.workers > 1:
            await pool.reload_tls(with_ticket_keys(spec, tickets))
        else:
            server.reload_tls(spec)
        log.info("certificate reloaded (%s)", why)

    watcher = None
    if acme is not None:  # the shipped unit's ExecReload must not end the server
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: log.info("SIGHUP: nothing to reload, -acme renews the certificate itself"),
        )
    if config.cert and not config.disable_tls:
        loop.add_signal_handler(
            signal.SIGHUP, lambda: spawn(reload_tls("SIGHUP"), name="reload certificate")
        )
        watcher = spawn(
            _watch_files((config.cert, config.key), reload_tls, config.limits.cert_poll_interval),
            name="cert watch",
        )
    if nofile:  # said once the start can no longer fail: a failed start is one line
        log.info("%s", nofile)
    ordering = spawn(acme.run(), name="acme") if acme is not None else None
    if http01 is not None:
        mode += f", HTTP-01 on {config.acme_http}"
    # Ready, signals included: whoever waits for this line may signal at once.
    log.info("tunnel listener on %s (%s), controller on %s", where, mode, controller_at)
    readiness.started = True  # after the line: whoever sees a 200 can count on it
    try:
        await stop.wait()
    finally:
        readiness.stopping = True
        log.info("shutting down: no new tunnels; open ones get %.0f s", config.grace)
        trimming.cancel()
        if watcher is not None:
            watcher.cancel()
        step_max = config.limits.shutdown_step_max
        if ordering is not None:
            # An ACME request in flight is left to its thread; the order's challenges are
            # withdrawn and its lock let go before the workers stop.
            ordering.cancel()
            await asyncio.wait({ordering}, timeout=step_max)
        if http01 is not None:
            http01.close()
        await _bounded("the controller", runner.cleanup(), step_max)
        if config.workers > 1:
            # bounded by itself: grace, then worker_exit_margin, then the workers are killed
            await pool.stop(config.grace)
        else:
            await _bounded("the tunnels", server.drain(config.grace), config.grace + step_max)
        await _bounded("the store (counters not yet written are lost)", service.close(), step_max)
        if config.bind_unix:
            with contextlib.suppress(OSError):
                os.unlink(config.bind)
        log.info("stopped")


async def _bounded(what: str, step: Coroutine[Any, Any, None], within: float) -> None:
    """Run one shutdown step for at most `within` seconds, then cancel it and go on:
    a stalled peer (a panel's half-sent body, a Redis that stopped answering) must not
    hold the exit past systemd's stop timeout. A step that fails is logged as its task's
    failure and the next step runs."""
    task = spawn(step, name=f"shutdown: {what}")
    done, _ = await asyncio.wait({task}, timeout=within)
    if not done:
        log.error("shutdown: %s did not finish within %.0f s; going on", what, within)
        task.cancel()


async def _watch_files(
    paths: Sequence[str], on_change: Callable[[str], Awaitable[None]], interval: float
) -> None:
    """Call on_change when a file's mtime or size changes (certbot renewals)."""

    def stamp() -> list[tuple[float, int] | None]:
        out: list[tuple[float, int] | None] = []
        for path in paths:
            try:
                st = os.stat(path)
                out.append((st.st_mtime, st.st_size))
            except OSError:
                out.append(None)
        return out

    last = stamp()
    while True:
        await asyncio.sleep(interval)
        now = stamp()
        if now != last and None not in now:
            last = now
            await on_change("certificate files changed")


def _start(values: dict[str, Any]) -> int:
    config = config_from_flags(values)
    setup_logging(config.verbose, json_format=config.log_json)
    # first, so the workers inherit it
    before, now, error = raise_nofile(config.limits.nofile_unlimited_cap)
    if error:
        log.warning("%s", describe(before, now, error))
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(config, "" if error else describe(before, now, error)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_flags(), sys.argv[1:] if argv is None else argv, _start)


if __name__ == "__main__":
    sys.exit(main())
