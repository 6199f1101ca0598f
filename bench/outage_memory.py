"""What a store outage costs in memory: the worker's RSS over requests answered while Object Storage fails, against
the same requests with the store up, measured in the same run.

    python bench/outage_memory.py            # 12 requests of four 1024² images each, per phase
    python bench/outage_memory.py --smoke    # small and few: checks the script works (benchcheck)

One `bentoml serve` with the tiny model stores in the loopback Object Storage fake (testbed/fakes). Phase
"store up": requests with their own ids, answered with stored images. Phase "store down": every Object Storage
call fails (503), so each answer carries its images inline and they wait in the spool on disk. The worker's
RSS is read after each answer (psutil); the figure is its growth per request (a least-squares slope), which
was 18.1 MB per four-image 1024² request before answers held for repeats stopped keeping image data.

Writes bench/results/outage_memory.json (or outage_memory-smoke.json) and prints a table.
"""

from __future__ import annotations

import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "sd3-medium"), str(HERE.parent)]
from machine import describe_machine, save_report, smoke_or_full  # noqa: E402

PLANS = {"full": {"requests": 12, "size": 1024, "images": 4}, "smoke": {"requests": 3, "size": 256, "images": 2}}


def slope(values: list[float]) -> float:
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / max(1e-9, sum((x - mean_x) ** 2
                                                                                          for x in range(n)))


def main(argv=None) -> dict:
    plan, out = smoke_or_full(__doc__, PLANS, "outage_memory", argv)

    import httpx
    import psutil

    from testbed.fakes import oci_common
    from testbed.fakes.object_storage import FakeObjectStorage
    from testbed.server import start_server, stop_server

    body = {"prompt": "a harbour at dawn", "width": plan["size"], "height": plan["size"], "num_inference_steps": 2,
            "num_images": plan["images"]}
    phases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sd3-outage-") as tmp, \
            FakeObjectStorage(namespace="benchns", buckets=("images",)) as bucket:
        tmp = Path(tmp)
        principal = bucket.trust(oci_common.resource_principal(tmp / "rp"))
        server = start_server(tmp / "server", {**principal.env, "BUCKET_NAME": "images", "NAMESPACE": "benchns",
                                               "OCI_OBJECT_STORAGE_ENDPOINT": bucket.endpoint,
                                               "STORE_TIMEOUT_SECONDS": "2", "SPOOL_DIR": str(tmp / "spool")},
                              timeout=300)
        try:
            worker = max(psutil.Process(server.process.pid).children(recursive=True),
                         key=lambda process: process.memory_info().rss)
            with httpx.Client(base_url=server.url, timeout=300) as client:
                for _ in range(2):  # the first large generations allocate what later ones reuse
                    assert client.post("/predict", json=body).status_code == 200
                for phase in ("store up", "store down"):
                    if phase == "store down":
                        bucket.outage(503)
                    rss, inline = [worker.memory_info().rss / 1e6], 0
                    for _ in range(plan["requests"]):
                        answer = client.post("/predict", json={**body, "request_id": uuid.uuid4().hex})
                        assert answer.status_code == 200, answer.text
                        inline += sum(len(image.get("data") or "") for image in answer.json()["images"])
                        rss.append(worker.memory_info().rss / 1e6)
                    phases[phase] = {"rss_mb": [round(value, 1) for value in rss],
                                     "mb_per_request": round(slope(rss), 2),
                                     "inline_mb_answered_per_request": round(inline / 1e6 / plan["requests"], 2)}
                bucket.restore()
        finally:
            stop_server(server)
    up, down = phases["store up"]["mb_per_request"], phases["store down"]["mb_per_request"]
    report = {"benchmark": "outage_memory", "plan": plan, "machine": describe_machine(), "phases": phases,
              "extra_mb_per_request_with_the_store_down": round(down - up, 2)}
    print(f"\nWorker RSS per request of {plan['images']} images at {plan['size']}², {plan['requests']} requests a "
          "phase:")
    for phase, figures in phases.items():
        print(f"  {phase:10}  {figures['mb_per_request']:7.2f} MB/request  ({figures['rss_mb'][0]} -> "
              f"{figures['rss_mb'][-1]} MB; answered inline {figures['inline_mb_answered_per_request']} MB/request)")
    print(f"  store down minus store up: {report['extra_mb_per_request_with_the_store_down']} MB/request\n")
    save_report(report, out)
    return report


if __name__ == "__main__":
    main()
