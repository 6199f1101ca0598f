"""The previews benchmark still runs: bench/previews.py in --smoke mode, 0 against 3 previews in the same run.

It checks what the script reports, never how fast anything was.
"""

from __future__ import annotations

import json

from bench_runner import run


def test_previews_benchmark_smoke(tmp_path):
    out = tmp_path / "previews.json"
    printed = run("previews.py", "--smoke", "--out", str(out), timeout=300)
    report = json.loads(out.read_text())
    assert report["preview_steps"] == [2, 3, 4] and report["previews_per_generation"] == 3
    assert report["estimate_and_decode_ms"]["samples"] == 3 * report["plan"]["samples"]
    assert report["x_without_previews"] > 0 and "of 0 previews" in printed
