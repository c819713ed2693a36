"""New tunnels of users with limits against a user without any, in one server: a
panel's users mostly have a quota and an expire, which a worker admits from the
budget it holds, while max_tunnels needs the supervisor's count of every worker."""

from __future__ import annotations

import contextlib
import statistics

from bench.context import Context, interleave
from bench.model import Failure
from bench.peers import TUNNEL_PATH, BenchError, EchoDst, OurRelay, start_ours
from bench.scenarios.setup_rate import RateSample, measure, rate_metrics
from bench.settings import Settings

SECTION = "Users with limits: new tunnels/s (ours, bench/go/mttbench rate)"
NO_LIMITS = "no limits"
# label -> (path, limits); far limits: nothing is refused or cut during the run
LIMITED = {
    "quota + expire": ("/limited-quota", {"quota": 10**15, "expire": 4102444800}),
    "quota + max_tunnels": ("/limited-count", {"quota": 10**15, "max_tunnels": 100000}),
}
TARGETS = {"quota + expire": 0.9}  # admitted in the worker: near a user without limits


def steps(s: Settings) -> int:
    return (len(LIMITED) + 1) * s.rounds


def run(ctx: Context) -> None:
    s = ctx.settings
    with contextlib.ExitStack() as stack:
        echo = EchoDst()
        stack.callback(echo.stop)
        ours = start_ours(ctx.certs, echo.addr)
        stack.callback(ours.stop)
        try:
            _add_limited(ours, echo.addr)
            _run(ctx, ours)
        except (BenchError, RuntimeError, OSError) as exc:
            ctx.results.failures.append(Failure(SECTION, "all", str(exc)))
            ctx.progress.note(f"users with limits: FAILED: {exc}")
            ctx.progress.skip(steps(s))


def _add_limited(relay: OurRelay, dst: str) -> None:
    relay.add_entries([{"path": path, "dst": dst, **limits} for path, limits in LIMITED.values()])


def _run(ctx: Context, ours: OurRelay) -> None:
    s = ctx.settings
    paths = {NO_LIMITS: TUNNEL_PATH} | {label: path for label, (path, _) in LIMITED.items()}

    def arm(path: str) -> RateSample:
        return measure(ours, "plain", s.rate_seconds, s.rate_max_ops, s.rate_concurrency, path=path)

    if s.warmup_seconds:
        ctx.progress.note("users with limits: warm-up")
        for path in paths.values():
            measure(ours, "plain", 0.5, s.rate_max_ops, s.rate_concurrency, path=path)
    arms = [(label, (lambda p=path: arm(p))) for label, path in paths.items()]
    samples = interleave(ctx, "users with limits", arms)
    base = samples[NO_LIMITS]
    for label in LIMITED:
        mine = samples[label]
        errors = sum(x.errors for x in mine)
        note = (
            f"p50 latency {statistics.median([x.p50_ms for x in mine]):.2f} ms, "
            f"without limits {statistics.median([x.p50_ms for x in base]):.2f} ms"
        )
        if errors:
            note += f"; {errors} failed ({next(x.first_error for x in mine if x.errors)[:120]})"
        ctx.results.metrics += rate_metrics(
            SECTION,
            (
                f"new tunnels/s, a user with {label}",
                f"server CPU per new tunnel, a user with {label}",
            ),
            mine,
            base,
            labels=(label, NO_LIMITS),
            target=TARGETS.get(label),
            note=note,
            cpu_note="all of the server's processes, from /proc, over the whole measurement",
        )
