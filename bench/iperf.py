"""One iperf3 client run with -J, parsed into bytes and bits per second."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass

from bench.peers import BenchError

SLACK_S = 15  # beyond -t: connect, tunnel setup, final exchange


class IperfHung(BenchError):
    """iperf3 did not finish in time: the tunnel is stuck, a retry would hang too."""


@dataclass(frozen=True)
class IperfRun:
    bytes: int  # payload bytes the receiver got (all streams)
    seconds: float
    bits_per_second: float

    @property
    def gbps(self) -> float:
        return self.bits_per_second / 1e9


def run_client(port: int, seconds: int, *, reverse: bool = False, parallel: int = 1) -> IperfRun:
    """iperf3 -c 127.0.0.1 -p port: upload, or download with reverse (-R)."""
    exe = shutil.which("iperf3")
    if exe is None:
        raise BenchError("iperf3 not found (apt-get install iperf3)")
    argv = [exe, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
    argv += ["--connect-timeout", "5000", "-P", str(parallel)]
    if reverse:
        argv.append("-R")
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + SLACK_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise IperfHung(f"iperf3 hung for more than {seconds + SLACK_S} s") from exc
    try:
        doc = json.loads(proc.stdout)
    except ValueError as exc:
        raise BenchError(f"iperf3 printed no JSON (rc {proc.returncode}): {proc.stderr}") from exc
    if "error" in doc:
        raise BenchError(f"iperf3: {doc['error']}")
    received = doc["end"]["sum_received"]
    return IperfRun(
        bytes=int(received["bytes"]),
        seconds=float(received["seconds"]),
        bits_per_second=float(received["bits_per_second"]),
    )
