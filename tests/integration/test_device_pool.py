"""Every device of the shape: the real server with `SD3_DEVICE=cpu,cpu` (two tiny pipelines, one shared queue)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx

from image_samples import b64, left_half_mask, noise

# Big enough that a request is still generating when the next one arrives, small enough for two CPU cores.
BUSY = {"width": 512, "height": 512, "num_inference_steps": 12}
EVENT = re.compile(r"\[(?P<request_id>[\w-]+)\] (?P<event>Generating on|Generated \d+ image\(s\) .* on) "
                   r"cpu \(device (?P<device>\d)\)")


def events(server) -> list[tuple[str, str, str]]:
    """(start|end, request_id, device index) for every generation, in the order the server logged them."""
    return [("start" if m["event"].startswith("Generating") else "end", m["request_id"], m["device"])
            for m in EVENT.finditer(server.log())]


def send_at_once(server, request_ids: list[str]) -> list[httpx.Response]:
    with server.client() as client, ThreadPoolExecutor(len(request_ids)) as pool:
        return list(pool.map(lambda rid: client.post("/predict", json={"prompt": rid, "request_id": rid, **BUSY}),
                             request_ids))


def test_two_devices_generate_at_the_same_time_and_three_requests_keep_both_busy(make_server):
    server = make_server({"SD3_DEVICE": "cpu,cpu"})
    with server.client() as client:
        health = client.get("/health").json()
    assert health["devices"] == [{"device": "cpu", "state": "ready"}, {"device": "cpu", "state": "ready"}]

    answers = send_at_once(server, ["pair-a", "pair-b"])
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    seen = [e for e in events(server) if e[1].startswith("pair-")]
    # Both started before either ended: the two generations overlapped, on different devices.
    assert [kind for kind, *_ in seen] == ["start", "start", "end", "end"], seen
    assert {device for *_, device in seen} == {"0", "1"}

    answers = send_at_once(server, ["three-a", "three-b", "three-c"])
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    seen = [e for e in events(server) if e[1].startswith("three-")]
    starts = [e for e in seen if e[0] == "start"]
    # Two run at once; the third starts on whichever device ends first, and no sooner.
    assert [kind for kind, *_ in seen[:3]] == ["start", "start", "end"], seen
    third = starts[2]
    first_end = seen[2]
    assert seen.index(third) > seen.index(first_end) and third[2] == first_end[2], seen

    # Image to image and inpainting run on every device too: each has its own pipelines over its own weights.
    start = b64(noise(512, 512))
    bodies = [{"prompt": "a", "request_id": "image-a", "image": start, **BUSY},
              {"prompt": "b", "request_id": "image-b", "image": start, "mask_image": b64(left_half_mask(512, 512)),
               **BUSY}]
    with server.client() as client, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda body: client.post("/predict", json=body), bodies))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    seen = [e for e in events(server) if e[1].startswith("image-")]
    assert [kind for kind, *_ in seen] == ["start", "start", "end", "end"], seen
    assert {device for *_, device in seen} == {"0", "1"}


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
