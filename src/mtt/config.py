"""Every size, buffer and wait of the server, named in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtt.core.policy import DstPolicy
from mtt.smux.session import SmuxConfig

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to every peer; the defaults follow mos-tls-tunnel where it has one."""

    # TLS handshake, then the HTTP upgrade request, each bounded (the Go client gives up at 10 s).
    handshake_timeout: float = 10.0
    # Idle timeout of a tunnel: no byte in either direction for this long closes it.
    idle_timeout: float = 60.0
    # Dialing a user's dst.
    connect_timeout: float = 10.0
    # Largest WebSocket frame accepted from a client (the Go client sends <= 16 KiB).
    max_ws_frame: int = 1 * MiB
    # Client bytes held while dst is still being dialed; reading stops beyond it.
    dial_buffer: int = 256 * KiB
    # Write-buffer high-water mark of each transport; past it the other side stops reading.
    write_high_water: int = 256 * KiB
    # When dst ends first, the close frame (and a stream's smux FIN) waits until what
    # was written before it has left our buffers and the kernel's send queue, the
    # client has it, for at most this long ...
    close_flush_max: float = 30.0
    # ... looking first after this, then at doubling intervals up to drain_quiet.
    close_flush_poll: float = 0.01
    # Then the close waits this long more (a stream's FIN), or until client data has
    # been quiet this long (a plain tunnel's close frame; the data is discarded) ...
    drain_quiet: float = 0.1
    # ... but never longer than this (docs/protocol.md §7).
    drain_max: float = 3.0
    # Controller request body cap (the original's 2 MiB).
    max_control_body: int = 2 * MiB
    # A controller connection's first request head must be complete this long after it opens
    # (a head is a few hundred bytes; nginx allows 60 s) ...
    controller_head_timeout: float = 10.0
    # ... and each body this long after its head (nginx's 60 s: 2 MiB at 35 KB/s).
    controller_body_timeout: float = 60.0
    # After a reply, the next request head must be complete within this, or the connection closes.
    controller_keepalive: float = 60.0
    # Open controller connections; past it new ones get a 503 and are closed at once. At start it
    # is lowered to a quarter of RLIMIT_NOFILE, so a flood leaves descriptors to the tunnels.
    controller_max_connections: int = 1024
    # smux sessions inside WebSockets.
    smux: SmuxConfig = field(default_factory=SmuxConfig)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What mtt-mu-server was asked to do, after flag parsing."""

    bind: str = ""
    bind_unix: bool = False
    controller: str = ""
    mux: bool = False
    cert: str = ""
    key: str = ""
    force_tls: bool = False
    disable_tls: bool = False
    server_name: str = ""
    fast_open: bool = False
    verbose: bool = False
    workers: int = 1
    kick_on_delete: bool = False
    metrics_per_user: bool = False
    db: str = "memory"  # SQLite file for users and counters, or "memory"
    store: str = ""  # redis://... : a user table shared by several nodes (instead of db)
    flush_interval: float = 10.0  # counters reach the store at least this often
    grace: float = 10.0
    fallback: str = ""
    log_json: bool = False
    # -trusted-proxy CIDRs (or "unix:") and -proxy-protocol: where client addresses come from.
    trusted_proxies: tuple[str, ...] = ()
    proxy_protocol: bool = False
    controller_token: str = field(default="", repr=False)
    allow_dst: DstPolicy = field(default_factory=DstPolicy)
    limits: Limits = field(default_factory=Limits)
