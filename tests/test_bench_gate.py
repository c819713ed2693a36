"""The benchmark's quick mode as a regression gate: it fails when ours falls
below half of the Go relay measured in the same run (or costs twice as much).

Connection setup is left out of this gate: it measures 0.55x today, within
the noise of the 0.5x line on a shared 2-core box, so it would flap; the full
run (`python -m bench`) reports it. Stalled connections are gated on their
own bound too: RSS after a wave must not stay 50% or more above its level
before. A gross regression fails both attempts; one noisy attempt does not
fail the suite.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # it compares speeds: nothing else may run
GATED = "throughput,scale,stalled,control"


def test_quick_benchmark_has_no_gross_regression() -> None:
    output = ""
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--only", GATED],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
        if result.returncode == 0:
            return
        output = result.stdout[-4000:] + result.stderr[-4000:]
    pytest.fail(f"quick benchmark gate failed twice:\n{output}")
