"""Our server with one worker against one per core (`-workers N`, SO_REUSEPORT worker
processes), where this build has the flag: what the extra processes buy on this box."""

from __future__ import annotations

import contextlib
import os
import statistics
from functools import partial

from bench.context import Context, interleave
from bench.measure import FLOWS, through_relay
from bench.model import Failure, Metric, Skip
from bench.peers import (
    TUNNEL_PATH,
    BenchError,
    EchoDst,
    IperfServer,
    OurRelay,
    server_help,
    start_ours,
)
from bench.procstat import machine_jiffies
from bench.scenarios.setup_rate import RateSample
from bench.scenarios.setup_rate import measure as measure_rate
from bench.settings import Settings

ALL = max(os.cpu_count() or 1, 2)
SECTION = f"Workers: -workers {ALL} vs -workers 1 (ours)"
FLOW = "plain 8 streams"


def steps(s: Settings) -> int:
    return 2 * s.rounds * 2


def run(ctx: Context) -> None:
    s = ctx.settings
    if "-workers" not in server_help():
        ctx.results.skips.append(
            Skip(SECTION, "all", "`mtt-mu-server -h` lists no -workers flag in this build")
        )
        ctx.progress.note("no -workers flag: skipped")
        return
    many_label, one_label = f"-workers {ALL}", "-workers 1"
    with contextlib.ExitStack() as stack:
        iperf = IperfServer()
        stack.callback(iperf.stop)
        echo = EchoDst()
        stack.callback(echo.stop)
        one = start_ours(ctx.certs, iperf.addr, "-workers", "1", label=one_label)
        stack.callback(one.stop)
        many = start_ours(ctx.certs, iperf.addr, "-workers", str(ALL), label=many_label)
        stack.callback(many.stop)
        flow = FLOWS[FLOW]
        idle: dict[str, list[float]] = {many_label: [], one_label: []}

        def rate(relay: OurRelay) -> RateSample:
            """One setup-rate run, noting how idle the machine was."""
            idle0, total0 = machine_jiffies()
            sample = measure_rate(
                relay, "plain", s.rate_seconds, s.rate_max_ops, s.rate_concurrency
            )
            idle1, total1 = machine_jiffies()
            idle[relay.label].append((idle1 - idle0) / max(total1 - total0, 1))
            return sample

        try:
            speeds = interleave(
                ctx,
                f"workers {FLOW}",
                [
                    (many_label, partial(through_relay, many, flow, s.iperf_seconds, iperf)),
                    (one_label, partial(through_relay, one, flow, s.iperf_seconds, iperf)),
                ],
            )
            for relay in (one, many):  # the setup-rate probe needs an echoing dst
                relay.add_users([(TUNNEL_PATH, echo.addr)])
            rates = interleave(
                ctx,
                "workers plain setup rate",
                [(many_label, partial(rate, many)), (one_label, partial(rate, one))],
            )
        except (BenchError, RuntimeError, OSError) as exc:
            ctx.results.failures.append(Failure(SECTION, "workers", str(exc)))
            ctx.progress.note(f"workers: FAILED: {exc}")
            return
    cores = {k: [x.cpu_us * x.rate / 1e6 for x in v] for k, v in rates.items()}
    busy = "; ".join(
        f"{label}: the server used {statistics.median(cores[label]):.2f} cores, the machine"
        f" was {statistics.median(idle[label]):.0%} idle"
        for label in (many_label, one_label)
    )
    setup_note = f"{busy} (docs/scaling.md: what more cores give)"
    for name, unit, samples, note in (
        (
            f"throughput, {FLOW}",
            "Gbit/s",
            {k: [x.gbps for x in v] for k, v in speeds.items()},
            "",
        ),
        (
            "new tunnels/s (plain)",
            "per s",
            {k: [x.rate for x in v] for k, v in rates.items()},
            setup_note,
        ),
    ):
        shared = "client, server and dst share the same 2 cores" if ALL <= 2 else ""
        ctx.results.metrics.append(
            Metric(
                section=SECTION,
                name=name,
                unit=unit,
                better="higher",
                ours=samples[many_label],
                ref=samples[one_label],
                ours_label=many_label,
                ref_label=one_label,
                note="; ".join(x for x in ("informational", shared, note) if x),
            )
        )
