"""Our Python mtt-client against the Go client, both through our server."""

from __future__ import annotations

import contextlib
from functools import partial

from bench.context import Context, interleave
from bench.measure import FLOWS, retry_note, through_relay
from bench.model import Failure, Metric, Skip
from bench.peers import BenchError, GoClient, IperfServer, PyClient, Unavailable, start_ours
from bench.settings import Settings

SECTION = "Python client vs Go client (our server)"


def steps(s: Settings) -> int:
    return len(s.client_flows) * s.rounds * 2


def run(ctx: Context) -> None:
    s = ctx.settings
    with contextlib.ExitStack() as stack:
        iperf = IperfServer()
        stack.callback(iperf.stop)
        server = start_ours(ctx.certs, iperf.addr)
        stack.callback(server.stop)
        try:  # probe once: a missing or unfinished client skips the whole section
            PyClient(server.addr, False).stop()
        except Unavailable as exc:
            ctx.results.skips.append(Skip(SECTION, "all flows", f"our mtt-client: {exc}"))
            ctx.progress.note(f"Python client unavailable, skipped: {exc}")
            return
        for name in s.client_flows:
            flow = FLOWS[name]
            try:
                samples = interleave(
                    ctx,
                    f"client {name}",
                    [
                        (
                            "Python client",
                            partial(through_relay, server, flow, s.iperf_seconds, iperf, PyClient),
                        ),
                        (
                            "Go client",
                            partial(through_relay, server, flow, s.iperf_seconds, iperf, GoClient),
                        ),
                    ],
                )
            except (BenchError, RuntimeError, OSError) as exc:
                # the client is compared with the Go client, not the relay: not gated
                ctx.results.failures.append(Failure(SECTION, name, str(exc), gate=False))
                ctx.progress.note(f"client {name}: FAILED: {exc}")
                continue
            ctx.results.metrics.append(
                Metric(
                    section=SECTION,
                    name=name,
                    unit="Gbit/s",
                    better="higher",
                    ours=[x.gbps for x in samples["Python client"]],
                    ref=[x.gbps for x in samples["Go client"]],
                    ours_label="Python client",
                    ref_label="Go client",
                    target=0.8,
                    note=retry_note(*samples.values()),
                )
            )
