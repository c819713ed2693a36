"""Benchmark suite: our mtt-mu-server against a Go relay, on loopback (`python -m bench`)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "bench" / ".build"
DOCS_DIR = ROOT / "docs"
