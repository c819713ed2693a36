"""New tunnels per second: fresh TLS + upgrade + dst dial + one byte echoed, and new smux
streams on a warm session, driven by bench/go/mttbench rate against both relays."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
from dataclasses import dataclass

from bench.context import SUSPECT, Context, confirm, interleave
from bench.gobuild import bench_binary
from bench.model import Failure, Metric
from bench.peers import (
    SERVER_NAME,
    TUNNEL_PATH,
    BenchError,
    EchoDst,
    Relay,
    start_gorelay,
    start_ours,
)
from bench.procstat import cpu_seconds
from bench.settings import Settings

SECTION = "Connection setup (bench/go/mttbench rate)"
MODES = {
    "plain": "new tunnels/s (TLS + upgrade + dial + echo)",
    "mux": "new smux streams/s on a warm session",
}
CPU_UNITS = {"plain": "new tunnel", "mux": "new smux stream"}


@dataclass(frozen=True)
class RateSample:
    rate: float
    p50_ms: float
    errors: int
    first_error: str
    cpu_us: float = 0.0  # the relay's CPU (all its processes) per operation


def steps(s: Settings) -> int:
    return len(MODES) * s.rounds * 2


def measure(
    relay: Relay,
    mode: str,
    seconds: float,
    max_ops: int,
    concurrency: int,
    *,
    path: str = TUNNEL_PATH,
) -> RateSample:
    argv = [
        str(bench_binary("mttbench")),
        "rate",
        "-url",
        f"wss://{SERVER_NAME}{path}",
        "-connect",
        relay.addr,
        "-sv",
        "-mode",
        mode,
        "-n",
        str(max_ops),
        "-d",
        f"{seconds}s",
        "-c",
        str(concurrency),
    ]
    before = cpu_seconds(relay.pid)
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError("mttbench rate hung") from exc
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise BenchError(f"mttbench rate: no result (rc {proc.returncode}): {proc.stderr}") from exc
    if not doc["ops"]:
        raise BenchError(f"no tunnel completed: {doc['first_errors'][:3]}")
    used = cpu_seconds(relay.pid) - before
    first = (doc.get("first_errors") or [""])[0]
    cpu_us = used / (int(doc["ops"]) + int(doc["errors"])) * 1e6
    return RateSample(float(doc["rate"]), float(doc["p50_ms"]), int(doc["errors"]), first, cpu_us)


def run(ctx: Context) -> None:
    s = ctx.settings
    with contextlib.ExitStack() as stack:
        echo = EchoDst()
        stack.callback(echo.stop)
        ours = start_ours(ctx.certs, echo.addr)
        stack.callback(ours.stop)
        go = start_gorelay(ctx.certs, echo.addr)
        stack.callback(go.stop)
        for mode, name in MODES.items():
            try:
                _run_mode(ctx, ours, go, mode, name)
            except (BenchError, RuntimeError, OSError) as exc:
                ctx.results.failures.append(Failure(SECTION, name, str(exc)))
                ctx.progress.note(f"{name}: FAILED: {exc}")
                ctx.progress.skip(s.rounds * 2)


def _run_mode(ctx: Context, ours: Relay, go: Relay, mode: str, name: str) -> None:
    s = ctx.settings

    def one(relay: Relay) -> RateSample:
        return measure(relay, mode, s.rate_seconds, s.rate_max_ops, s.rate_concurrency)

    if s.warmup_seconds:
        ctx.progress.note(f"{mode} setup: warm-up")
        for relay in (ours, go):
            measure(relay, mode, 0.5, s.rate_max_ops, s.rate_concurrency)
    arms = [("ours", lambda: one(ours)), ("Go relay", lambda: one(go))]
    samples = interleave(ctx, f"{mode} setup rate", arms)
    confirm(ctx, f"{mode} setup rate", arms, samples, _suspect)
    mine, theirs = samples["ours"], samples["Go relay"]
    notes = [
        f"p50 latency ours {statistics.median([x.p50_ms for x in mine]):.2f} ms, "
        f"Go {statistics.median([x.p50_ms for x in theirs]):.2f} ms; {s.rate_concurrency} at a time"
    ]
    for label, xs in (("ours", mine), ("Go", theirs)):
        errors = sum(x.errors for x in xs)
        if errors:
            first = next(x.first_error for x in xs if x.errors)
            notes.append(f"{label}: {errors} failed ({first[:120]})")
    ctx.results.metrics += rate_metrics(
        SECTION,
        (name, f"server CPU per {CPU_UNITS[mode]}"),
        mine,
        theirs,
        target=0.8,
        gate=True,
        note="; ".join(notes),
        cpu_note="all of the relay's processes, from /proc, over the whole measurement",
    )


def rate_metrics(
    section: str,
    names: tuple[str, str],
    mine: list[RateSample],
    ref: list[RateSample],
    *,
    labels: tuple[str, str] = ("ours", "Go relay"),
    target: float | None = None,
    gate: bool = False,
    note: str = "",
    cpu_note: str = "",
) -> list[Metric]:
    """The rate (names[0]) and the CPU per operation (names[1]) of samples beside a baseline."""
    return [
        Metric(
            section=section,
            name=names[0],
            unit="per s",
            better="higher",
            ours=[x.rate for x in mine],
            ref=[x.rate for x in ref],
            ours_label=labels[0],
            ref_label=labels[1],
            target=target,
            gate=gate,
            note=note,
        ),
        Metric(
            section=section,
            name=names[1],
            unit="CPU us",
            better="lower",
            ours=[x.cpu_us for x in mine],
            ref=[x.cpu_us for x in ref],
            ours_label=labels[0],
            ref_label=labels[1],
            note=cpu_note,
        ),
    ]


def _suspect(samples: dict[str, list[RateSample]]) -> bool:
    ours = statistics.median(x.rate for x in samples["ours"])
    return ours < SUSPECT * statistics.median(x.rate for x in samples["Go relay"])
