"""The LoRA benchmark still runs: bench/loras.py in --smoke mode, measuring against the plain model in the same run.

It checks what the script reports, never how fast anything was.
"""

from __future__ import annotations

import json

from bench_runner import run


def test_lora_benchmark_smoke(tmp_path):
    out = tmp_path / "loras.json"
    run("loras.py", "--smoke", "--out", str(out), timeout=300)
    report = json.loads(out.read_text())
    assert report["downloads"] == report["plan"]["samples"]  # each adapter fetched once, however often used
    assert set(report["per_step"]) == {"plain (LoRA disabled)", "one adapter, unfused", "one adapter, fused",
                                       "two adapters, unfused"}
    assert report["per_step"]["plain (LoRA disabled)"]["x_plain"] == 1.0
    for figure in ("first_use_ms", "used_again_ms", "switch_ms"):
        assert report[figure]["median"] > 0
