"""Asynchronous requests and the ledger with the local store: the real server, tiny model, images in a folder."""

from __future__ import annotations

import hashlib
import json
import time

from image_samples import b64
from integration.conftest import start_server, stop_server
from integration.test_service import file_of, predict

BUSY = {"width": 512, "height": 512, "num_inference_steps": 30}


def statuses_until_done(server, request_id: str, timeout: float = 120) -> tuple[list, dict]:
    """Every poll's (status code, state, progress) until the answer comes, and the answer."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = predict(server, {"request_id": request_id})
        if response.status_code == 200:
            return seen, response.json()
        assert response.status_code == 202, response.text
        assert int(response.headers["retry-after"]) == response.json()["retry_after"] >= 1
        seen.append((response.json()["status"], response.json()["position"], response.json()["progress"]))
        time.sleep(0.05)
    raise AssertionError(f"never answered: {seen[-5:]}")


def test_wait_false_answers_202_then_polls_show_queued_running_and_the_answer(server):
    ahead = predict(server, {"prompt": "ahead", "request_id": "async-ahead", "wait": False, **BUSY})
    accepted = predict(server, {"prompt": "a tide pool", "request_id": "async-tide", "wait": False, **BUSY})
    assert ahead.status_code == accepted.status_code == 202, accepted.text
    assert accepted.json()["request_id"] == "async-tide" and accepted.json()["status"] == "queued"

    seen, answer = statuses_until_done(server, "async-tide")
    states = [state for state, *_ in seen]
    assert "queued" in states and "running" in states, seen
    assert states.index("running") > states.index("queued") and "queued" not in states[states.index("running"):]
    assert any(position == 1 for state, position, _ in seen if state == "queued"), seen  # next in line
    steps = [progress["step"] for state, _, progress in seen if state == "running" and progress]
    assert steps and steps == sorted(steps) and all(p["steps"] == 30 for *_, p in seen if p), seen
    assert answer["request_id"] == "async-tide" and file_of(answer["images"][0]).is_file()
    statuses_until_done(server, "async-ahead")


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


def test_a_restart_answers_the_same_and_leaves_the_file_untouched(tmp_path):
    body = {"prompt": "a lighthouse", "request_id": "retry-after-restart", "width": 256, "height": 256,
            "num_inference_steps": 2}
    first_server = start_server(tmp_path)
    try:
        first = predict(first_server, body).json()
    finally:
        stop_server(first_server)
    path = file_of(first["images"][0])
    written = path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()

    restarted = start_server(tmp_path)  # the same image folder, a new process
    try:
        again = predict(restarted, body)
        assert again.status_code == 200 and again.json() == first, again.text
        assert "[retry-after-restart] Generating" not in restarted.log()
        assert (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()) == written
        assert written[1] == first["images"][0]["sha256"]
    finally:
        stop_server(restarted)
