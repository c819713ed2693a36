"""The benchmark's own Go programs (bench/go/<name>), built like the test peers."""

from __future__ import annotations

from pathlib import Path

from harness.gopeers import go_binary

from bench import ROOT

GO_DIR = ROOT / "bench" / "go"


def bench_binary(name: str) -> Path:
    """Path of the built bench/go/<name> binary, building it if its sources changed."""
    return go_binary(name, src_root=GO_DIR)
