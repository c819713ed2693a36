"""iperf3 through the Go client and each relay: six traffic shapes, with the server's
CPU seconds per GB and a no-tunnel iperf3 run as the ceiling."""

from __future__ import annotations

import contextlib
import statistics

from bench.context import SUSPECT, Context, confirm, interleave
from bench.measure import FLOWS, Flow, Sample, direct, retry_note, through_relay
from bench.model import Failure, Metric
from bench.peers import BenchError, IperfServer, start_gorelay, start_ours
from bench.settings import Settings

SECTION = "Throughput (Go client, iperf3)"
CPU_SECTION = "Server CPU per GB moved"


def _arms(s: Settings, flow: Flow) -> int:
    return 3 if s.direct_baseline and not flow.mux else 2


def steps(s: Settings) -> int:
    return sum(s.rounds * _arms(s, f) for f in FLOWS.values())


def run(ctx: Context) -> None:
    s = ctx.settings
    directs: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        iperf = IperfServer()
        stack.callback(iperf.stop)
        for flow in FLOWS.values():
            try:
                _run_flow(ctx, flow, iperf, directs)
            except (BenchError, RuntimeError, OSError) as exc:
                ctx.results.failures.append(Failure(SECTION, flow.name, str(exc)))
                ctx.progress.note(f"{flow.name}: FAILED: {exc}")
                ctx.progress.skip(s.rounds * _arms(s, flow))


def _run_flow(
    ctx: Context, flow: Flow, iperf: IperfServer, directs: dict[str, list[float]]
) -> None:
    s = ctx.settings
    with contextlib.ExitStack() as stack:
        ours = start_ours(ctx.certs, iperf.addr)
        stack.callback(ours.stop)
        go = start_gorelay(ctx.certs, iperf.addr)
        stack.callback(go.stop)
        if s.warmup_seconds:
            ctx.progress.note(f"{flow.name}: warm-up")
            for relay in (ours, go):
                through_relay(relay, flow, s.warmup_seconds, iperf)
        arms = [
            ("ours", lambda: through_relay(ours, flow, s.iperf_seconds, iperf)),
            ("Go relay", lambda: through_relay(go, flow, s.iperf_seconds, iperf)),
        ]
        if _arms(s, flow) == 3:
            arms.append(("direct", lambda: direct(flow, s.iperf_seconds, iperf)))
        samples = interleave(ctx, flow.name, arms)
        confirm(ctx, flow.name, arms, samples, _suspect)
        traceback = ours.log_has_traceback()
    if "direct" in samples:
        directs[flow.direct_key] = [x.gbps for x in samples["direct"]]
    notes = ["our server logged a traceback"] if traceback else []
    notes += [n for n in [retry_note(*samples.values())] if n]
    mine, theirs = samples["ours"], samples["Go relay"]
    ctx.results.metrics.append(
        Metric(
            section=SECTION,
            name=flow.name,
            unit="Gbit/s",
            better="higher",
            ours=[x.gbps for x in mine],
            ref=[x.gbps for x in theirs],
            direct=directs.get(flow.direct_key, []),
            target=1.0,
            gate=True,
            note="; ".join(notes),
        )
    )
    ctx.results.metrics.append(
        Metric(
            section=CPU_SECTION,
            name=flow.name,
            unit="CPU s/GB",
            better="lower",
            ours=[x.cpu_s_per_gb for x in mine],
            ref=[x.cpu_s_per_gb for x in theirs],
            target=1.1,
            gate=True,
            note=_cpu_note(mine, theirs),
        )
    )


def _cpu_note(mine: list[Sample], theirs: list[Sample]) -> str:
    """CPU per GB hides how busy a relay was; show the CPU share too."""

    def share(xs: list[Sample]) -> float:
        return statistics.median(x.cpu_s_per_gb * x.gbps / 8 for x in xs)

    return f"CPU use while relaying: ours {share(mine):.0%}, Go {share(theirs):.0%} of one core"


def _suspect(samples: dict[str, list[Sample]]) -> bool:
    ours, go = samples["ours"], samples["Go relay"]
    speed = statistics.median(x.gbps for x in ours) / statistics.median(x.gbps for x in go)
    cpu = statistics.median(x.cpu_s_per_gb for x in go) / statistics.median(
        x.cpu_s_per_gb for x in ours
    )
    return min(speed, cpu) < SUSPECT
