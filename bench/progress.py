"""A progress line per measured step on stderr, so a long run shows where it is."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts steps against a planned total; prints `[k/N] label (elapsed)`."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.started = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        self.note(label, counted=True)

    def skip(self, steps: int) -> None:
        """Account for planned steps that will not run (a skipped or failed scenario)."""
        self.done += max(steps, 0)

    def note(self, label: str, *, counted: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        where = f"[{min(self.done, self.total)}/{self.total}]" if counted else "      "
        print(f"{where} {label} ({elapsed:5.0f} s)", file=self.stream, flush=True)
