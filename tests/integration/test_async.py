"""Asynchronous requests and the ledger with the local store: the real server, tiny model, images in a folder."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

from image_samples import b64
from integration.test_service import file_of, predict
from testbed.server import start_server, stop_server

SMALL = {"width": 256, "height": 256, "num_inference_steps": 6}


def statuses_until_done(server, request_id: str, timeout: float = 120, until=None) -> tuple[list, dict | None]:
    """Every poll's (state, position, progress) until the answer comes (or `until(seen)` holds), and the answer."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = predict(server, {"request_id": request_id})
        if response.status_code == 200:
            return seen, response.json()
        assert response.status_code == 202, response.text
        assert int(response.headers["retry-after"]) == response.json()["retry_after"] >= 1
        seen.append((response.json()["status"], response.json()["position"], response.json()["progress"]))
        if until is not None and until(seen):
            return seen, None
        time.sleep(0.02)
    raise AssertionError(f"never answered: {seen[-5:]}")


def test_wait_false_answers_202_then_polls_show_queued_running_and_the_answer(server):
    ahead, tide = f"async-ahead-{uuid.uuid4().hex[:6]}", f"async-tide-{uuid.uuid4().hex[:6]}"
    try:
        first = predict(server, {"prompt": server.hold(ahead), "request_id": ahead, "wait": False, **SMALL})
        assert first.status_code == 202, first.text
        # Nothing else waits: the first answer says it is next (or already running).
        assert (first.json()["status"], first.json()["position"]) in (("queued", 1), ("running", None)), first.text
        server.wait_held(ahead)
        accepted = predict(server, {"prompt": server.hold(tide), "request_id": tide, "wait": False, **SMALL})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json() | {"retry_after": 0} == {"request_id": tide, "status": "queued", "position": 1,
                                                       "progress": None, "retry_after": 0}
        queued, _ = statuses_until_done(server, tide, until=lambda seen: len(seen) >= 2)
        assert all(seen == ("queued", 1, None) for seen in queued), queued  # behind the running one, next in line
        server.release(ahead)
        server.wait_held(tide)
        running, _ = statuses_until_done(server, tide, until=lambda seen: len(seen) >= 2)
        assert all(seen == ("running", None, {"step": 1, "steps": 6}) for seen in running), running  # held at step 1
        server.release(tide)
        rest, answer = statuses_until_done(server, tide)
    finally:
        server.release(ahead), server.release(tide)
    steps = [progress["step"] for state, _, progress in rest if state == "running" and progress]
    assert steps == sorted(steps) and all(state == "running" for state, *_ in rest), rest
    assert answer["request_id"] == tide and file_of(answer["images"][0]).is_file()
    statuses_until_done(server, ahead)


def test_a_failed_request_answers_its_own_error_when_polled(server):
    failed = predict(server, {"prompt": "x", "request_id": "bad-start", "image": b64(b"not an image")})
    assert failed.status_code == 400, failed.text
    polled = predict(server, {"request_id": "bad-start"})
    assert polled.status_code == 400, polled.text
    assert {key: polled.json()["error"][key] for key in ("code", "field", "message")} == \
        {key: failed.json()["error"][key] for key in ("code", "field", "message")}


def test_records_hold_no_prompt_text_and_no_input_bytes(server):
    start = b64(b"\x89PNG not really")
    predict(server, {"prompt": "a very private prompt", "request_id": "private", "image": start})
    text = (server.image_dir / "sd3" / "requests" / "private.json").read_text()
    assert "a very private prompt" not in text and start not in text
    assert json.loads(text)["parameters"]["prompt"] == {"sha256": hashlib.sha256(b"a very private prompt").hexdigest()}


def test_a_restart_answers_the_same_and_leaves_the_file_untouched_even_with_its_device_busy(tmp_path):
    import base64
    from concurrent.futures import ThreadPoolExecutor

    import openai

    body = {"prompt": "a lighthouse", "request_id": "retry-after-restart", "width": 256, "height": 256,
            "num_inference_steps": 2}
    key, sdk_body = "openai-after-restart", {"prompt": "a kite", "size": "256x256",
                                             "extra_body": {"num_inference_steps": 2, "seed": 3}}
    first_server = start_server(tmp_path)
    try:
        first = predict(first_server, body).json()
        with openai.OpenAI(base_url=first_server.url + "/v1", api_key="unused", max_retries=0) as client:
            first_b64 = client.images.generate(**sdk_body, extra_headers={"Idempotency-Key": key}).data[0].b64_json
    finally:
        stop_server(first_server)
    path = file_of(first["images"][0])
    written = path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()

    # The same image folder, a new process whose one device is busy and whose queue has no room: a repeat is
    # answered from its record before any admission (on both surfaces), where a new request gets 429.
    restarted = start_server(tmp_path, {"MAX_QUEUE": "0"}, gates=True)
    try:
        with ThreadPoolExecutor(1) as thread:
            busy = thread.submit(predict, restarted, {"prompt": restarted.hold("busy"), "width": 256, "height": 256,
                                                      "num_inference_steps": 2})
            try:
                restarted.wait_held("busy")
                assert predict(restarted, {**body, "request_id": "a-new-one"}).status_code == 429
                again = predict(restarted, body)
                with openai.OpenAI(base_url=restarted.url + "/v1", api_key="unused", max_retries=0) as client:
                    again_b64 = client.images.generate(**sdk_body, extra_headers={"Idempotency-Key": key})
            finally:
                restarted.release("busy")
            assert busy.result().status_code == 200
        assert again.status_code == 200 and again.json() == first, again.text
        assert base64.b64decode(again_b64.data[0].b64_json) == base64.b64decode(first_b64)
        assert "[retry-after-restart] Generating" not in restarted.log() and f"[{key}] Generating" not in \
            restarted.log()
        assert (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()) == written
        assert written[1] == first["images"][0]["sha256"]
    finally:
        stop_server(restarted)
