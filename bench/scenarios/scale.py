"""Many concurrent open tunnels: the server's RSS per tunnel, and proof that every
tunnel still echoes while all are open (bench/go/mttbench hold).

Each plain tunnel costs the server two descriptors (client and dst), so the
plain count is capped by RLIMIT_NOFILE when the hard limit cannot be raised;
smux streams (16 per WebSocket) need about one, so they reach 10,000 anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from bench.context import Context, interleave
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
    stop_process,
)
from bench.procstat import rss_bytes
from bench.settings import Settings

SECTION = "Scale: concurrent open tunnels"
WARM_TUNNELS = 32
CONCURRENCY = 32
STREAMS_PER_SESSION = 16
SETTLE_S = 1.0
HOLD_LIMIT_S = 180  # mttbench's own deadline for opening or checking all tunnels
FD_RESERVE = 200  # listeners, controller, logs, the warm-up's leftovers


@dataclass(frozen=True)
class ScaleSample:
    kib_per_tunnel: float
    open_seconds: float


def steps(s: Settings) -> int:
    return (len(s.scale_counts) + bool(s.scale_mux_streams)) * s.rounds * 2


def plain_cap() -> int:
    """The most plain tunnels one server process can hold under our RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (soft - FD_RESERVE) // 2


def _read_json_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The next JSON line from mttbench hold, waiting at most timeout."""
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"mttbench hold gave no result within {timeout:.0f} s")
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise BenchError(f"mttbench hold exited with {proc.wait(5)}")
            buf += chunk
    doc: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return doc


def _hold(relay: Relay, n: int, mode: str) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """Open n tunnels; returns (open result, relay RSS once all are open, echo result)."""
    argv = [str(bench_binary("mttbench")), "hold", "-url", f"wss://{SERVER_NAME}{TUNNEL_PATH}"]
    argv += ["-connect", relay.addr, "-sv", "-n", str(n), "-c", str(CONCURRENCY)]
    argv += ["-mode", mode, "-streams", str(STREAMS_PER_SESSION), "-timeout", f"{HOLD_LIMIT_S}s"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdin is not None
    try:
        opened = _read_json_line(proc, HOLD_LIMIT_S + 30)
        time.sleep(SETTLE_S)
        rss = rss_bytes(relay.pid)
        proc.stdin.write(b"echo\n")
        proc.stdin.flush()
        echoed = _read_json_line(proc, HOLD_LIMIT_S + 30)
        proc.stdin.close()
        proc.wait(30)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    return opened, rss, echoed


def measure(start: Callable[[], Relay], n: int, mode: str) -> ScaleSample:
    """A fresh relay per sample: RSS growth is only comparable from the same start."""
    relay = start()
    try:
        _hold(relay, WARM_TUNNELS, mode)  # TLS, imports, pools: first-use costs out of the delta
        time.sleep(SETTLE_S)
        before = rss_bytes(relay.pid)
        opened, after, echoed = _hold(relay, n, mode)
        if not relay.alive():
            raise BenchError(f"{relay.label} died holding {n} tunnels")
    finally:
        relay.stop()
    if opened.get("failed") or echoed.get("failed"):
        errors = (opened.get("first_errors") or []) + (echoed.get("first_errors") or [])
        raise BenchError(
            f"{relay.label}: {opened.get('opened', 0)}/{n} opened, "
            f"{echoed.get('echoed', 0)}/{n} echoed; first errors: {errors[:3]}"
        )
    return ScaleSample((after - before) / n / 1024, float(opened["elapsed_s"]))


def run(ctx: Context) -> None:
    s = ctx.settings
    plan = [("plain", n) for n in s.scale_counts]
    if s.scale_mux_streams:
        plan.append(("mux", s.scale_mux_streams))
    with contextlib.ExitStack() as stack:
        echo = EchoDst()
        stack.callback(echo.stop)
        ours = partial(start_ours, ctx.certs, echo.addr)
        go = partial(start_gorelay, ctx.certs, echo.addr)
        for mode, wanted in plan:
            n = min(wanted, plain_cap()) if mode == "plain" else wanted
            what = "plain tunnels" if mode == "plain" else "smux streams"
            name = f"RSS per open tunnel, {n:,} {what}"
            notes = []
            if n < wanted:
                notes.append(
                    f"capped from {wanted:,}: RLIMIT_NOFILE is "
                    f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]:,} here and cannot be "
                    "raised, and each plain tunnel holds 2 descriptors in the server"
                )
            if mode == "mux":
                notes.append(f"{STREAMS_PER_SESSION} streams per WebSocket, each with its own dst")
            try:
                samples = interleave(
                    ctx,
                    f"{n:,} open {what}",
                    [
                        ("ours", partial(measure, ours, n, mode)),
                        ("Go relay", partial(measure, go, n, mode)),
                    ],
                )
            except (BenchError, RuntimeError, OSError) as exc:
                ctx.results.failures.append(Failure(SECTION, name, str(exc)))
                ctx.progress.note(f"{name}: FAILED: {exc}")
                continue
            mine, theirs = samples["ours"], samples["Go relay"]
            notes.append(
                f"all {n:,} echoed again while all were open, every round; opening all took "
                f"ours {max(x.open_seconds for x in mine):.1f} s, "
                f"Go {max(x.open_seconds for x in theirs):.1f} s "
                f"({CONCURRENCY} WebSockets at a time)"
            )
            ctx.results.metrics.append(
                Metric(
                    section=SECTION,
                    name=name,
                    unit="KiB",
                    better="lower",
                    ours=[x.kib_per_tunnel for x in mine],
                    ref=[x.kib_per_tunnel for x in theirs],
                    target=1.0,
                    gate=n >= 1000,
                    note="; ".join(notes),
                )
            )
