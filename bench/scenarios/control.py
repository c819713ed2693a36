"""The control plane (ours only: the Go relay has no controller): one bulk add, and
whether a million loaded users slow the controller or the relay."""

from __future__ import annotations

import contextlib
import json
import statistics
import time

from bench.context import Context, interleave
from bench.measure import FLOWS, retry_note, through_relay
from bench.model import Failure, Metric, Skip
from bench.peers import BenchError, IperfServer, OurRelay, start_ours
from bench.procstat import rss_bytes
from bench.settings import Settings

SECTION = "Control plane (ours only)"
BATCH = 40_000  # users per request: 40,000 short entries stay under the 2 MiB body cap
UNUSED_DST = "127.0.0.1:10001"  # never dialed: no tunnel uses these users
FIRST_OWN_PORT = 10001  # a port per user, as panels give each user its own backend
OWN_PORTS = 50_000
NO_CHANGE_ROUNDS = 2  # "no measurable slowdown" needs more samples than a ratio does


def steps(s: Settings) -> int:
    many = 2 * NO_CHANGE_ROUNDS * s.rounds * 2 + 2 if s.many_users else 0
    return 2 * s.rounds + many


def _add_body(first: int, count: int, prefix: str, *, own_dst: bool = False) -> bytes:
    """An add of count users; own_dst: each its own port (never dialed either)."""
    bunch = [
        {
            "path": f"/{prefix}{i:07d}",
            "dst": f"127.0.0.1:{FIRST_OWN_PORT + i % OWN_PORTS}" if own_dst else UNUSED_DST,
        }
        for i in range(first, first + count)
    ]
    return json.dumps({"opt": 1, "args_bunch": bunch}, separators=(",", ":")).encode()


def _checked(relay: OurRelay, body: bytes) -> float:
    reply = relay.control(body)
    if reply.status != 200 or reply.body.get("res") != 1:
        raise BenchError(f"controller refused: {reply.status} {reply.body}")
    return reply.seconds


def _ping_ms(relay: OurRelay, count: int) -> float:
    """Median of count pings, each on a fresh connection, as a panel would send them."""
    times = [_checked(relay, b'{"opt":9}') * 1000 for _ in range(count)]
    return statistics.median(times)


def run(ctx: Context) -> None:
    s = ctx.settings
    with contextlib.ExitStack() as stack:
        iperf = IperfServer()
        stack.callback(iperf.stop)
        try:
            _bulk(ctx, iperf)
        except (BenchError, RuntimeError, OSError) as exc:
            ctx.results.failures.append(Failure(SECTION, "bulk add", str(exc)))
            ctx.progress.note(f"bulk add: FAILED: {exc}")
        if not s.many_users:
            ctx.results.skips.append(
                Skip(SECTION, "1,000,000 users loaded", "not in --quick (loading takes ~20 s)")
            )
            return
        try:
            _many(ctx, iperf)
        except (BenchError, RuntimeError, OSError) as exc:
            ctx.results.failures.append(Failure(SECTION, "many users", str(exc)))
            ctx.progress.note(f"many users: FAILED: {exc}")


def _bulk(ctx: Context, iperf: IperfServer) -> None:
    """Panels add users of one backend (one dst for all), or of a port each
    (every dst its own): the two take different ways, so both are timed."""
    s = ctx.settings
    kinds = {
        "one dst": (_add_body(0, s.bulk_users, "u"), 0.25),
        "each its own dst": (_add_body(0, s.bulk_users, "u", own_dst=True), 0.25),
    }
    # The default store, as a panel meets it: every change in the SQLite file
    # (synchronous=FULL) before the reply, not only in memory.
    relay = start_ours(ctx.certs, iperf.addr, "-db", str(ctx.workdir / "bulk-users.db"))
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for r in range(s.rounds):
            for kind, (body, _) in kinds.items():  # alternated: both meet the same load
                ctx.progress.step(
                    f"bulk add of {s.bulk_users:,} users, {kind}: round {r + 1}/{s.rounds}"
                )
                _checked(relay, b'{"opt":3}')  # reset: every round adds into an empty table
                times[kind].append(_checked(relay, body))
    finally:
        relay.stop()
    for kind, (body, limit) in kinds.items():
        ctx.results.metrics.append(
            Metric(
                section=SECTION,
                name=f"bulk add of {s.bulk_users:,} users, {kind} (one request)",
                unit="s",
                better="lower",
                ours=times[kind],
                limit=limit,
                note=(
                    f"{len(body) / 2**20:.2f} MiB body; wall time of the POST, reply included;"
                    " SQLite store (-db, the default)"
                ),
            )
        )


def _many(ctx: Context, iperf: IperfServer) -> None:
    s = ctx.settings
    label = f"{s.many_users:,} users"
    flow = FLOWS["plain upload"]
    with contextlib.ExitStack() as stack:
        one = start_ours(ctx.certs, iperf.addr, label="1 user")
        stack.callback(one.stop)
        many = start_ours(ctx.certs, iperf.addr, label=label)
        stack.callback(many.stop)
        ctx.progress.step(f"loading {label} in batches of {BATCH:,}")
        rss_before = rss_bytes(many.pid)
        started = time.perf_counter()
        for first in range(0, s.many_users, BATCH):
            _checked(many, _add_body(first, min(BATCH, s.many_users - first), "m"))
        load_s = time.perf_counter() - started
        rss_mib = (rss_bytes(many.pid) - rss_before) / 2**20
        # Relay first, pings after: the tunnels must not depend on what pings do.
        speeds = interleave(
            ctx,
            "relay throughput (plain upload)",
            [
                (label, lambda: through_relay(many, flow, s.iperf_seconds, iperf)),
                ("1 user", lambda: through_relay(one, flow, s.iperf_seconds, iperf)),
            ],
            rounds=NO_CHANGE_ROUNDS * s.rounds,
        )
        users = many.control(b'{"opt":9}').body.get("current_users")
        if users != s.many_users + 1:
            raise BenchError(f"ping says {users} users after loading {s.many_users + 1}")
        pings = interleave(
            ctx,
            "controller ping",
            [
                (label, lambda: _ping_ms(many, s.ping_count)),
                ("1 user", lambda: _ping_ms(one, s.ping_count)),
            ],
            rounds=NO_CHANGE_ROUNDS * s.rounds,
        )
        ctx.progress.step("a new tunnel after the pings")
        pings_sent = s.ping_count * NO_CHANGE_ROUNDS * s.rounds
        try:
            through_relay(one, flow, 1, iperf)
        except BenchError as exc:
            ctx.results.failures.append(
                Failure(
                    SECTION,
                    "tunnels after controller pings",
                    f"a new tunnel fails after {pings_sent} pings (opt 9), though ping "
                    f"still counts the user: {exc}",
                )
            )
    ctx.results.metrics.append(
        Metric(
            section=SECTION,
            name=f"relay throughput (plain upload), {label} vs 1 user",
            unit="Gbit/s",
            better="higher",
            ours=[x.gbps for x in speeds[label]],
            ref=[x.gbps for x in speeds["1 user"]],
            ours_label=label,
            ref_label="1 user",
            target=0.95,
            overlap_ok=True,
            note=(
                f"loading {label} took {load_s:.1f} s ({s.many_users // BATCH} requests of "
                f"{BATCH:,}), +{rss_mib:.0f} MiB server RSS"
                + (f"; {retried}" if (retried := retry_note(*speeds.values())) else "")
            ),
        )
    )
    ctx.results.metrics.append(
        Metric(
            section=SECTION,
            name=f"controller ping latency, {label} vs 1 user",
            unit="ms",
            better="lower",
            ours=pings[label],
            ref=pings["1 user"],
            ours_label=label,
            ref_label="1 user",
            target=1.1,
            overlap_ok=True,
            note=f"median of {s.ping_count} pings per round, each on a fresh connection",
        )
    )
