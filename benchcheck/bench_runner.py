"""Run a benchmark script of bench/ as a user does, for the tests that check the benchmarks still run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: float) -> str:
    """`python bench/<script> <args>` from the repository; its output, or the test fails with its end."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout
