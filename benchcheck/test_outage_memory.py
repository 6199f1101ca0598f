"""The outage memory benchmark still runs: bench/outage_memory.py --smoke, with the store up, then down.

It checks what the script reports, never how much memory anything took.
"""

from __future__ import annotations

import json

from bench_runner import run


def test_outage_memory_smoke(tmp_path):
    out = tmp_path / "outage_memory.json"
    run("outage_memory.py", "--smoke", "--out", str(out), timeout=600)
    report = json.loads(out.read_text())
    up, down = report["phases"]["store up"], report["phases"]["store down"]
    assert len(up["rss_mb"]) == len(down["rss_mb"]) == report["plan"]["requests"] + 1
    # With the store down, every image was answered inline; with it up, none was.
    assert down["inline_mb_answered_per_request"] > 0 and up["inline_mb_answered_per_request"] == 0
