"""Every size, buffer and wait of the server, named in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtt.core.harvest import HarvestBounds
from mtt.core.leases import WhenDown
from mtt.core.policy import DstPolicy
from mtt.core.users import MuxProtocol
from mtt.muxcool.session import MuxCoolConfig
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
    # picows' first read buffer of each WebSocket, grown when a frame needs more: it is most of
    # the memory of an idle tunnel, so it starts small.
    ws_read_buffer: int = 16 * KiB
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
    # At shutdown, after the last tunnels were closed, the loop runs this long more so their
    # close frames reach the sockets.
    shutdown_flush: float = 0.1
    # Controller request body cap (the original's 2 MiB).
    max_control_body: int = 2 * MiB
    # Longest user path a controller command may name, in characters: the API document's
    # maxLength (openapi.json), which a test holds to this.
    max_user_path: int = 4096
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
    # The TLS listener reads at most this much of a ClientHello itself, before the TLS layer
    # takes the connection over and reads the rest (a hello is a few KiB at most, a
    # post-quantum key share included).
    max_client_hello: int = 64 * KiB
    # Largest HTTP request head on the tunnel port (nginx's large_client_header_buffers, 4 x 8 KiB);
    # the request line of plain HTTP sent to the TLS port is cut at it too.
    max_request_head: int = 16 * KiB
    # Early data in Sec-WebSocket-Protocol, decoded (docs/protocol.md §10): Xray's clients
    # send at most their `ed` (2048 or 2560 in the configs they share); more is refused.
    max_early_data: int = 3 * KiB
    # X-Forwarded-For entries looked at, from the right, for a request from a trusted proxy: a
    # longer list is cut (entries further left are not believed anyway; 32 is more hops than any
    # real chain of proxies).
    max_forwarded_hops: int = 32
    # Largest PROXY protocol v2 header, addresses plus TLVs (its length field would allow 64 KiB,
    # haproxy's proxy-protocol.txt §2.2; senders stay far below 4 KiB, and it is read before TLS).
    max_proxy_v2_header: int = 4096
    # Requests on one keep-alive connection of the tunnel port's HTTP front; then it closes,
    # like nginx's keepalive_requests.
    max_keepalive_requests: int = 100
    # How long an unread request body is waited for before the connection closes after an
    # error reply (nginx's lingering_timeout).
    lingering_timeout: float = 5.0
    # Queue of not yet accepted connections of every listening socket (tunnel, workers, client).
    listen_backlog: int = 4096
    # With -fast-open, connections opened with data in their SYN and not yet accepted, per
    # listening socket (TCP_FASTOPEN's queue length, as nginx's listen ... fastopen=number).
    fast_open_queue: int = 256
    # TLS sessions may be resumed (and tickets say so) for this long: nginx's ssl_session_timeout
    # default, 5m, which a client sees in every ticket's lifetime hint.
    tls_session_timeout: int = 300
    # A -cert or -key file is read up to this size: a chain is a few KiB.
    max_pem_file: int = 16 * MiB
    # A user's rate is handed to the processes in grants (core/rate.py): a quiet user may spend
    # this many seconds of it at once ...
    rate_burst: float = 0.05
    # ... and each grant adds, beyond what was asked, at least 1/rate_grants_per_second of a
    # second of the rate, and at least rate_min_grant bytes: a throttled user's process asks the
    # service some 20 times a second, and a slow rate is not handed out a few bytes at a time.
    rate_grants_per_second: int = 20
    rate_min_grant: int = 4096
    # A user without a rate (or whose rate was lifted) is granted this much per ask.
    rate_unlimited_grant: int = 1 << 30
    # How often open tunnels' counters are collected: how stale quota decisions and metrics
    # may be for open tunnels.
    collect_interval: float = 1.0
    # How often -cert and -key are checked for a new certificate (SIGHUP reloads at once).
    cert_poll_interval: float = 5.0
    # Largest message on the supervisor-worker channel: a full snapshot of a million users
    # is well below this; a larger length is a broken channel.
    max_worker_message: int = 1 << 30
    # Messages queued on that channel are written at once, not at the end of the loop
    # iteration, when a sender waits for room and they add up to this much.
    worker_write_at: int = 64 * KiB
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
    # /readyz calls a worker down when it has not answered a counter collection (every
    # collect_interval) for this long: stuck, or dead and not restarted yet.
    worker_answer_max_age: float = 5.0
    # Each other step of a shutdown (controller, store flush) gets at most this; one that
    # overruns is logged and cancelled, so the process still exits within systemd's stop
    # timeout (what it still held is said in the log).
    shutdown_step_max: float = 12.0
    # Where the hard RLIMIT_NOFILE is unlimited (macOS), the soft one cannot follow it and is
    # raised to this: Linux's own ceiling (fs.nr_open) defaults to it.
    nofile_unlimited_cap: int = 1 << 20
    # How often a process looks whether a burst of closed connections left its C heap mostly
    # free (workers/heap.py); a look is one mallinfo2 call.
    heap_check_interval: float = 1.0
    # It trims when at least this fraction of the heap is free (a burst has ended) ...
    heap_trim_free_fraction: float = 0.25
    # ... and at least this much is free, and RSS has grown by as much since the last trim ...
    heap_trim_growth: int = 8 * MiB
    # ... or the heap's use has fallen by this much since (a burst still closing at that trim).
    heap_trim_freed: int = 2 * MiB
    # Trims (about 20 ms for 1.6 GB of heap) are at least this far apart ...
    heap_trim_min_gap: float = 1.0
    # ... and this many times the last one's duration: trims take at most 5% of the time.
    heap_trim_cost_factor: int = 20
    # How long the SQLite store (-db) waits for another process's lock on the file (an operator's
    # sqlite3 shell) before a write fails.
    sqlite_busy_timeout: float = 5.0
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
    # Counters are flushed to Redis in script calls of this many users each (one pipeline):
    # Redis runs a script to its end before serving anyone else ...
    redis_flush_chunk: int = 2000
    # ... and read this many users per HMGET: Lua's unpack() stops near 8000 values.
    redis_read_chunk: int = 1000
    # The subscription to Redis's changes is retried after this, doubling up to ...
    redis_retry_min: float = 0.25
    # ... this.
    redis_retry_max: float = 1.0
    # redis-py pings an idle pooled connection older than this before using it.
    redis_health_check_interval: float = 15.0
    # /readyz calls Redis unreachable when nothing it was sent (the table check every
    # redis_check_interval included) has been answered for this long.
    redis_ready_max_age: float = 5.0
    # max_tunnels and max_ips across nodes (docs/redis.md, "Limits across nodes"): each
    # tunnel admitted against them is leased in Redis for this long ...
    redis_lease: float = 15.0
    # ... and every node renews its leases this often, so a node that dies frees its
    # slots between redis_lease - redis_lease_renew and redis_lease after its end.
    redis_lease_renew: float = 5.0
    # While Redis does not answer, one admission in this interval asks it again; the
    # others follow -redis-limits-when-down at once.
    redis_limits_retry: float = 1.0
    # Leases renewed or released per script call (one pipeline): a script runs to its end
    # before Redis serves anyone else.
    redis_lease_chunk: int = 1000
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
    # A certificate is renewed when 1/acme_renew_fraction of its lifetime is left (a third, as
    # Let's Encrypt advises), or acme_renew_ahead_max before its end if that comes first
    # (certbot's 30 days).
    acme_renew_fraction: int = 3
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
    # Harvests (opts 7, 8, 10): id length, paths per request, users and bytes per reply,
    # acknowledged ids remembered.
    harvest: HarvestBounds = field(default_factory=HarvestBounds)
    # Mux.Cool sessions inside WebSockets (its idle_timeout is set from -timeout).
    muxcool: MuxCoolConfig = field(default_factory=MuxCoolConfig)

    @property
    def expire_horizon(self) -> float:
        """How far ahead an `expire` gets its timer: an enforcement (after each
        collection) arms the ones within two intervals, so none is missed."""
        return 2 * self.collect_interval


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What mtt-mu-server was asked to do, after flag parsing."""

    bind: str = ""
    bind_unix: bool = False
    controller: str = ""
    # What a WebSocket carries when the client names no sub-protocol (-mux, -mux-protocol).
    mux_protocol: MuxProtocol = MuxProtocol.NONE
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
    # -redis-limits-when-down: admission of a user with max_tunnels or max_ips while
    # Redis does not answer (docs/redis.md, "Limits across nodes").
    limits_when_down: WhenDown = WhenDown.OPEN
    grace: float = 10.0
    fallback: str = ""
    log_json: bool = False
    # -trusted-proxy CIDRs (or "unix:") and -proxy-protocol: where client addresses come from.
    trusted_proxies: tuple[str, ...] = ()
    # -allow-origin: the browser origins let in (empty: any Origin, docs/security.md).
    allowed_origins: tuple[str, ...] = ()
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
