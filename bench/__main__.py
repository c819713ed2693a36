"""`python -m bench`: run the scenarios, write the report, exit 1 on a gross regression.

.venv/bin/python -m bench            full run (~11 min on 2 cores) -> docs/benchmarks.md + .png
.venv/bin/python -m bench --quick    < 1 min gate -> bench/.build/quick/
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

from harness.gopeers import go_binary

from bench import BUILD_DIR, DOCS_DIR, ROOT
from bench.context import Context
from bench.gobuild import bench_binary
from bench.model import Failure, Results, Skip
from bench.peers import BenchError, make_certs, server_help
from bench.procstat import machine_busy_seconds, own_seconds, raise_nofile
from bench.progress import Progress
from bench.report import markdown, write_chart
from bench.scenarios import SCENARIOS
from bench.settings import Settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    keys = [s.key for s in SCENARIOS]
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 1 s runs: a CI gate")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(keys)}")
    p.add_argument("--rounds", type=int, help="override the number of A/B rounds")
    p.add_argument("--seconds", type=int, help="override iperf3 -t")
    p.add_argument("--out", type=Path, help="directory for benchmarks.md/.png")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="only re-render a saved last-results.json"
    )
    args = p.parse_args(argv)
    unknown = {k for k in args.only.split(",") if k} - set(keys)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from {keys}")
    return args


def _run(argv: list[str], timeout: float = 20) -> str:
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def server_config() -> str:
    """How our server runs in every scenario but the workers one: as users start it."""
    found = re.search(r"-workers int\n[^\n]*\(default (\d+)\)", server_help())
    workers = f" (which here means -workers {found.group(1)})" if found else ""
    return f"our server runs with its defaults{workers} plus -cert/-key and -timeout 5m0s"


def machine_info(settings: Settings, command: str, nofile: int) -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    libs = ", ".join(f"{n} {metadata.version(n)}" for n in ("uvloop", "picows", "aiohttp"))
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _run(["git", "rev-parse", "--short", "HEAD"])
        + (" + uncommitted changes" if dirty not in ("?", "") else ""),
        "command": command,
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libraries": libs,
        "go": _run(["go", "version"]),
        "iperf3": _run(["iperf3", "--version"]),
        "nofile": f"RLIMIT_NOFILE {nofile:,} for the run and its children (as high as allowed)",
        "settings": settings.describe(),
        "server": server_config(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings.quick_gate() if args.quick else Settings.full()
    if args.rounds:
        settings = dataclasses.replace(settings, rounds=args.rounds)
    if args.seconds:
        settings = dataclasses.replace(settings, iperf_seconds=args.seconds)
    only = [k for k in args.only.split(",") if k]
    chosen = [s for s in SCENARIOS if s.key in only or (not only and (s.gated or not args.quick))]
    partial = args.quick or bool(args.only) or args.rounds or args.seconds
    out_dir: Path = args.out or (
        BUILD_DIR / ("quick" if args.quick else "partial") if partial else DOCS_DIR
    )
    command = " ".join([".venv/bin/python -m bench", *map(shlex.quote, sys.argv[1:])])
    if args.render:
        results = Results.from_json(json.loads(args.render.read_text()))
        return write_report(results, args.out or DOCS_DIR)
    nofile = raise_nofile()
    started = time.monotonic()
    busy0, own0 = machine_busy_seconds(), own_seconds()
    results = Results()
    for s in SCENARIOS:
        if s not in chosen and not only:
            results.skips.append(Skip(s.title, "all", "informational: not in --quick"))
    progress = Progress(sum(s.steps(settings) for s in chosen))
    progress.note("building the Go peers (cached after the first run)")
    try:
        for name in ("gorelay", "mttclient"):
            go_binary(name)
        bench_binary("mttbench")
    except RuntimeError as exc:
        print(f"cannot build the Go peers: {exc}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="mtt-bench-") as tmp:
        ctx = Context(settings, progress, results, make_certs(Path(tmp)), Path(tmp))
        for scenario in chosen:
            first = progress.done
            progress.note(f"== {scenario.title}")
            try:
                scenario.run(ctx)
            except (BenchError, RuntimeError, OSError) as exc:
                results.failures.append(Failure(scenario.title, "scenario", str(exc)))
                progress.note(f"{scenario.key}: FAILED: {exc}")
            except Exception as exc:  # a bug here must not lose the other scenarios' numbers
                results.failures.append(
                    Failure(scenario.title, "scenario", traceback.format_exc(limit=5))
                )
                progress.note(f"{scenario.key}: ERROR: {exc!r}")
            progress.done = first + scenario.steps(settings)

    elapsed = time.monotonic() - started
    foreign = (machine_busy_seconds() - busy0) - (own_seconds() - own0)
    results.info = machine_info(settings, command, nofile)
    results.info["other load"] = (
        f"processes outside the benchmark used {max(foreign, 0):.0f} CPU-s during the run "
        f"({max(foreign, 0) / elapsed:.0%} of one core on average)"
        + (
            "; the numbers are disturbed: rerun on a quiet machine"
            if foreign > 0.1 * elapsed
            else ""
        )
    )
    if foreign > 0.1 * elapsed:
        print(f"warning: {results.info['other load']}", file=sys.stderr)
    results.info["duration"] = f"the run took {elapsed / 60:.1f} min"
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    (BUILD_DIR / "last-results.json").write_text(json.dumps(results.to_json(), indent=1))
    return write_report(results, out_dir)


def write_report(results: Results, out_dir: Path) -> int:
    """benchmarks.md and benchmarks.png in out_dir; returns the exit code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = out_dir / "benchmarks.png"
    has_chart = write_chart(results, chart)
    (out_dir / "benchmarks.md").write_text(markdown(results, chart.name if has_chart else None))
    print(
        f"wrote {out_dir / 'benchmarks.md'}"
        + (f" and {chart}" if has_chart else " (no chart: pip install matplotlib)"),
        file=sys.stderr,
    )
    return verdict(results)


def verdict(results: Results) -> int:
    """Print the targets; 1 on a gross regression or a scenario that could not be measured."""
    for m in results.metrics:
        met = m.met()
        mark = "  " if met is None else ("ok" if met else "NO")
        ratio = m.ratio()
        print(f"{mark} {m.section} / {m.name}: " + (f"{ratio:.2f}x" if ratio else "-"))
    gross = results.gross_regressions()
    for m in gross:
        if m.gross_limit is not None:
            median = statistics.median(m.ours)
            print(
                f"GROSS REGRESSION: {m.section} / {m.name}: {median:.3g} {m.unit}, "
                f"at or above {m.gross_limit:g}"
            )
        else:
            print(f"GROSS REGRESSION: {m.section} / {m.name}: {m.ratio():.2f}x of {m.ref_label}")
    for f in results.failures:
        print(f"FAILED: {f.section} / {f.name}: {f.error.splitlines()[0]}")
    return 1 if gross or results.gating_failures() else 0


if __name__ == "__main__":
    sys.exit(main())
