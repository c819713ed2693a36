"""`python -m bench.profile`: where our server spends its CPU while relaying.

Runs one iperf3 flow (Go client -> our server -> iperf3 -s) under
`py-spy record --format raw --subprocesses` (workers are child processes) and
prints the top functions by own time and by inclusive time. py-spy is not a
dependency: `.venv/bin/pip install py-spy`.

    .venv/bin/python -m bench.profile                      # plain upload and mux upload
    .venv/bin/python -m bench.profile --flow "mux 8 streams" --seconds 10 --native
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import BUILD_DIR
from bench.iperf import run_client
from bench.measure import FLOWS
from bench.peers import GoClient, IperfServer, make_certs, start_ours

SCAFFOLDING = 0.9  # frames on nearly every stack (runpy, uvloop's run loop) say nothing
_LOCATION = re.compile(r" \((.*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """`handler (/x/y/src/mtt/transport/plain.py:120)` -> `handler (transport/plain.py)`."""
    match = _LOCATION.search(frame)
    if not match:
        return frame
    where = match.group(1)
    for marker in ("/src/mtt/", "/site-packages/", "/lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{frame[: match.start()]} ({where})"


def summarise(raw: Path, top: int) -> str:
    """Own (leaf) and inclusive sample shares per function from py-spy's folded stacks."""
    own: collections.Counter[str] = collections.Counter()
    own_where: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        names = [frame_name(f) for f in frames]
        total += count
        own[names[-1]] += count
        leaf = _LOCATION.search(names[-1])
        own_where[leaf.group(1) if leaf else names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    if not total:
        return "no samples (is the server busy? py-spy needs ptrace rights)"
    lines = [f"{total} samples", "", "own time (the function itself was on CPU):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["", "own time by library or source file:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own_where.most_common(top)]
    lines += [
        "",
        "inclusive time (the function or what it called; event-loop scaffolding left out):",
    ]
    busy = [(name, n) for name, n in inclusive.most_common() if n < SCAFFOLDING * total]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in busy[:top]]
    return "\n".join(lines)


def profile_flow(flow_name: str, seconds: int, native: bool, rate: int, out: Path) -> Path:
    """One iperf3 run under py-spy; returns the folded-stack file."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    flow = FLOWS[flow_name]
    raw = out / f"{flow_name.replace(' ', '-')}.folded"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        iperf = IperfServer()
        stack.callback(iperf.stop)
        server = start_ours(make_certs(Path(tmp)), iperf.addr)
        stack.callback(server.stop)
        client = GoClient(server.addr, flow.mux, flow.max_stream)
        stack.callback(client.stop)
        run_client(client.port, 1, reverse=flow.reverse, parallel=flow.parallel)  # warm-up
        argv = [pyspy, "record", "--pid", str(server.pid), "--subprocesses"]
        argv += ["--format", "raw", "--rate", str(rate), "--duration", str(seconds + 1)]
        # --native must pause the process to unwind C stacks; otherwise don't perturb it
        argv += ["-o", str(raw)] + (["--native"] if native else ["--nonblocking"])
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        result = run_client(client.port, seconds, reverse=flow.reverse, parallel=flow.parallel)
        try:
            _, err = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-800:]}")
        print(f"== {flow_name}: {result.gbps:.2f} Gbit/s under the profiler ({seconds} s)")
    return raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("--flow", action="append", choices=sorted(FLOWS), help="repeatable")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rate", type=int, default=200, help="samples per second")
    p.add_argument("--native", action="store_true", help="include C frames (uvloop, ssl)")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    out = BUILD_DIR / "profile"
    out.mkdir(parents=True, exist_ok=True)
    for name in args.flow or ["plain upload", "mux upload"]:
        raw = profile_flow(name, args.seconds, args.native, args.rate, out)
        print(f"(folded stacks: {raw})")
        print(summarise(raw, args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
