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
    # 250 ms: a Go client on a busy host pauses longer than 100 ms between writes.
    drain_quiet: float = 0.25
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
    # The controller takes at most 1/controller_fd_share of the descriptors (the quarter above):
    # the tunnel listener, in the same process with -workers 1, keeps the rest through a flood.
    controller_fd_share: int = 4
    # At shutdown, a controller request still in progress (a body still arriving) gets this
    # long before it is cut, so a slow panel cannot hold the process past systemd's stop timeout.
    controller_shutdown_wait: float = 2.0
    # A flood of refused controller connections is logged once, then at most this often.
    controller_refusal_log_interval: float = 60.0
    # Largest HTTP request head on the tunnel port (nginx's large_client_header_buffers, 4 x 8 KiB).
    max_request_head: int = 16 * KiB
    # Requests on one keep-alive connection of the tunnel port's HTTP front; then it closes,
    # like nginx's keepalive_requests.
    max_keepalive_requests: int = 100
    # How long an unread request body is waited for before the connection closes after an
    # error reply (nginx's lingering_timeout).
    lingering_timeout: float = 5.0
    # Queue of not yet accepted connections of every listening socket (tunnel, workers, client).
    listen_backlog: int = 4096
    # How often open tunnels' counters are collected: how stale quota decisions and metrics
    # may be for open tunnels.
    collect_interval: float = 1.0
    # How often -cert and -key are checked for a new certificate (SIGHUP reloads at once).
    cert_poll_interval: float = 5.0
    # Largest message on the supervisor-worker channel: a full snapshot of a million users
    # is well below this; a larger length is a broken channel.
    max_worker_message: int = 1 << 30
    # A started worker must say it is ready within this ...
    worker_start_timeout: float = 30.0
    # ... and apply a change within this, or it is restarted ...
    worker_apply_timeout: float = 60.0
    # ... after this pause, so a worker that dies at once does not spin.
    worker_restart_delay: float = 1.0
    # At shutdown, workers get the grace period plus this to exit before they are killed ...
    worker_exit_margin: float = 15.0
    # ... and their final reports this long to arrive.
    worker_final_report_wait: float = 5.0
    # Each other step of a shutdown (controller, store flush) gets at most this; one that
    # overruns is logged and left behind, so the process still exits within systemd's stop
    # timeout (what it still held is said in the log).
    shutdown_step_max: float = 12.0
    # Every read and connect of a Redis store (-store redis://): a stalled Redis is an error.
    redis_socket_timeout: float = 5.0
    # How often a node compares its user table's revision with Redis's (a lost change
    # message is repaired within redis_check_interval + redis_settle) ...
    redis_check_interval: float = 2.0
    # ... and how long a revision Redis has may stay unannounced before a reload.
    redis_settle: float = 0.5
    # A change bigger than this is announced to the other nodes by its revision only
    # (they reload the table) rather than every subscriber buffering megabytes.
    redis_max_published: int = 1 * MiB
    # The subscription to Redis's changes is retried after this, doubling up to ...
    redis_retry_min: float = 0.25
    # ... this.
    redis_retry_max: float = 1.0
    # redis-py pings an idle pooled connection older than this before using it.
    redis_health_check_interval: float = 15.0
    # ACME (-acme): each HTTP request to the CA ...
    acme_request_timeout: float = 30.0
    # ... and a whole order, from asking for it to holding the certificate, polls included.
    acme_order_timeout: float = 180.0
    # A failed order is retried after this, doubling each time up to acme_retry_max: a
    # broken setup costs the CA a few orders an hour (Let's Encrypt allows 5 failed
    # validations per name and hour).
    acme_retry_first: float = 120.0
    acme_retry_max: float = 3600.0
    # Two orders that succeed are at least this far apart, whatever the certificates' dates.
    acme_min_interval: float = 10.0
    # A certificate is renewed when a third of its lifetime is left, or this long before its
    # end if that comes first (certbot's 30 days).
    acme_renew_ahead_max: float = 30 * 86400.0
    # While a renewal is far off, the clock is looked at this often (a suspended host wakes
    # up to a renewal that is due, not to a sleep of weeks measured on a stopped clock).
    acme_check_interval: float = 3600.0
    # The -acme-http listener (HTTP-01): open connections at most (more are closed at once),
    # the largest request head, and the time a connection gets to send it.
    acme_http_max_connections: int = 256
    acme_http_max_head: int = 8 * KiB
    acme_http_timeout: float = 10.0
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
    # -acme: certificates ordered from an ACME CA (RFC 8555) for these DNS names, with the
    # account's contact, the CA's directory URL, the HTTP-01 listener ("" answers
    # TLS-ALPN-01 on the tunnel port only), a trust root for the directory's HTTPS ("" for
    # the system's) and the directory keeping the account key and certificates.
    acme_domains: tuple[str, ...] = ()
    acme_email: str = ""
    acme_directory: str = ""
    acme_http: str = ""
    acme_ca_bundle: str = ""
    acme_dir: str = ""
    controller_token: str = field(default="", repr=False)
    allow_dst: DstPolicy = field(default_factory=DstPolicy)
    limits: Limits = field(default_factory=Limits)
