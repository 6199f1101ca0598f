"""Every device of the shape: the real server with `SD3_DEVICE=cpu,cpu` (two tiny pipelines, one shared queue)."""

from __future__ import annotations

import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from image_samples import b64, left_half_mask, noise

SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}
EVENT = re.compile(r"\[(?P<request_id>[\w-]+)\] (?P<event>Generating on|Generated \d+ image\(s\) .* on) "
                   r"cpu \(device (?P<device>\d)\)")


def events(server) -> list[tuple[str, str, str]]:
    """(start|end, request_id, device index) for every generation, in the order the server logged them."""
    return [("start" if m["event"].startswith("Generating") else "end", m["request_id"], m["device"])
            for m in EVENT.finditer(server.log())]


def send_held(server, bodies: dict[str, dict], pool: ThreadPoolExecutor):
    """Send each body (by request id) at once, each held at the gate named after its id; the futures of the answers."""
    def send(request_id):
        with server.client() as client:
            return client.post("/predict", json={"prompt": server.hold(request_id), "request_id": request_id,
                                                  **SMALL, **bodies[request_id]})
    return {request_id: pool.submit(send, request_id) for request_id in bodies}


def run_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def test_both_devices_generate_at_the_same_time_and_a_third_request_takes_the_first_free_one(pool):
    with pool.client() as client:
        health = client.get("/health").json()
    assert health["devices"] == [{"device": "cpu", "state": "ready"}, {"device": "cpu", "state": "ready"}]

    a, b, c = run_id("pair-a"), run_id("pair-b"), run_id("pair-c")
    with ThreadPoolExecutor(3) as threads:
        answers = send_held(pool, {a: {}, b: {}}, threads)
        pool.wait_held(a), pool.wait_held(b)  # both inside a generation at once: one on each device
        answers |= send_held(pool, {c: {}}, threads)
        with pool.client() as client:
            while (queued := client.post("/predict", json={"request_id": c})).status_code != 202:
                time.sleep(0.02)  # not accepted yet
        assert queued.json()["status"] == "queued" and queued.json()["position"] == 1, queued.text
        pool.release(a)
        pool.wait_held(c)  # the third starts once a device is free, on the device that freed
        pool.release(b), pool.release(c)
        assert [answers[r].result().status_code for r in (a, b, c)] == [200, 200, 200]
    seen = {request_id: [(kind, device) for kind, rid, device in events(pool) if rid == request_id]
            for request_id in (a, b, c)}
    assert {seen[a][0][1], seen[b][0][1]} == {"0", "1"}, seen
    assert seen[c][0][1] == seen[a][0][1], seen
    order = [(kind, rid) for kind, rid, _ in events(pool) if rid in (a, b, c)]
    assert order.index(("start", c)) > order.index(("end", a)), order


def test_image_to_image_and_inpainting_run_on_both_devices_at_once(pool):
    # Each device has its own image pipelines over its own weights.
    start = b64(noise(256, 256))
    img2img, inpaint = run_id("image-a"), run_id("image-b")
    with ThreadPoolExecutor(2) as threads:
        answers = send_held(pool, {img2img: {"image": start},
                                   inpaint: {"image": start, "mask_image": b64(left_half_mask(256, 256))}}, threads)
        pool.wait_held(img2img), pool.wait_held(inpaint)
        pool.release(img2img), pool.release(inpaint)
        assert [answers[r].result().status_code for r in (img2img, inpaint)] == [200, 200]
    devices = {device for kind, rid, device in events(pool) if rid in (img2img, inpaint)}
    assert devices == {"0", "1"}


def test_a_device_that_fails_to_load_is_named_and_the_other_serves(make_server):
    # No GPU on this machine: placing on cuda:0 fails for real, as a broken GPU's would.
    server = make_server({"SD3_DEVICE": "cpu,cuda:0", "SD3_DTYPE": "float32"})
    with server.client() as client:
        health = client.get("/health")
        answer = client.post("/predict", json={"prompt": "still serving", "width": 256, "height": 256,
                                               "num_inference_steps": 2})
    assert health.status_code == 200, health.text
    cpu, gpu = health.json()["devices"]
    assert cpu == {"device": "cpu", "state": "ready"}
    assert gpu["device"] == "cuda:0" and gpu["state"] == "failed" and gpu["error"]
    assert answer.status_code == 200 and answer.json()["images"][0]["stored"]
    assert "Placing the model on cuda:0 (device 1) failed" in server.log()


def test_bentoml_hides_no_gpu_from_the_worker(server):
    # BentoML sets CUDA_VISIBLE_DEVICES for a worker of a service that declares GPU resources, which would leave
    # the pool one GPU of a multi-GPU shape. The test's environment sets none, so the worker must see none.
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    workers = [pid for pid in _children(server.process.pid)]
    assert workers, "no worker process found"
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(entry.startswith(b"CUDA_VISIBLE_DEVICES=") for entry in environ), pid


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in map(int, children):
            found += [child, *_children(child)]
    return found
