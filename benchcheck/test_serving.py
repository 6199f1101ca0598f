"""The serving benchmark still runs: bench/serving.py in --smoke mode (every request answered and stored, the
server's image equal to the in-process one).

They check what the scripts report, never how fast anything was (benchcheck/bench_runner.py runs a script).
"""

from __future__ import annotations

import json

from bench_runner import run
from PIL import Image


def test_serving_benchmark_smoke(tmp_path):
    run("serving.py", "--smoke", "--out-dir", str(tmp_path), timeout=400)
    report = json.loads((tmp_path / "serving-smoke.json").read_text())
    tax = report["serving_tax"]
    assert {"service, local store, fpng", "service, local store, Pillow PNG"} <= set(tax)
    for row in tax.values():
        assert row["all_stored"] and row["server_image_equals_in_process_image"]
        assert len(row["end_to_end_ms"]) == len(row["in_process_ms"]) == report["plan"]["samples"]
        assert set(row["median_stage_ms"]) == {"queue", "generate", "encode", "store"}
    assert {row["png_encoder"] for row in tax.values()} == {"fpng", "pillow"}
    if "service, Object Storage (loopback), fpng" in tax:
        assert tax["service, Object Storage (loopback), fpng"]["example_uri"].startswith("oci://")
        # Per request with its own id: a read (a repeat is answered before admission), a claim, a final record.
        ledger = report["ledger"]
        assert ledger["record_call_kinds"] == {"GET": 3, "PUT if-none-match": 3, "PUT if-match": 3}
        assert ledger["record_calls_per_request"] == 3 and ledger["median_record_calls_ms"] > 0
    openai_row = report["openai"]  # the same image through both routes, in pairs
    assert openai_row["pairs"] == len(openai_row["openai_ms"]) == len(openai_row["predict_ms"]) == 2
    assert openai_row["median_openai_ms"] > 0 and openai_row["median_predict_ms"] > 0
    for system in ("service", "naive"):
        rows = report["throughput"][system]
        assert [row["clients"] for row in rows] == report["plan"]["concurrency"]
        for row in rows:  # nothing lost
            assert row["ok"] == row["requests"] == row["clients"] * report["plan"]["requests_per_client"]
            assert row["throughput_per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0
            assert row["rounds"] == len(row["throughput_per_round"]) == report["plan"]["load_rounds"]
            assert row["x_in_process_rate"] > 0
    reference = report["throughput_reference"]["per_level"]  # measured in the same rounds as the servers
    assert [level["clients"] for level in reference] == report["plan"]["concurrency"]
    assert all(len(level["in_process_ms"]) == report["plan"]["load_rounds"] * report["plan"]["reference_samples"]
               for level in reference)
    with Image.open(tmp_path / "serving-smoke.png") as plot:
        assert plot.format == "PNG" and plot.width > 500
