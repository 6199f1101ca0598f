"""The device-pool benchmark still runs: bench/device_pool.py in --smoke mode (nothing lost).

They check what the scripts report, never how fast anything was (benchcheck/bench_runner.py runs a script).
"""

from __future__ import annotations

import json

from bench_runner import run


def test_device_pool_benchmark_smoke(tmp_path):
    out = tmp_path / "pool.json"
    run("device_pool.py", "--smoke", "--out", str(out), timeout=400)
    report = json.loads(out.read_text())
    assert [(r["devices"], r["seconds_per_image"]) for r in report["pool"]] == [(1, 0.2), (2, 0.2)]
    for result in report["pool"]:
        assert result["answered_and_stored"] == result["requests"] == 3 * result["devices"]  # nothing lost
        assert result["statuses"] == [200] and result["images_per_s"] > 0 and result["tax_ms_median"] is not None
    assert 0 <= report["gil"]["gil_share"] <= 1 and report["module_calls_per_step"]["sd3_medium"] > \
        report["module_calls_per_step"]["tiny"]
