"""What `/metrics` and the log tell an operator, read from the real server with two devices (`SD3_DEVICE=cpu,cpu`)."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from image_samples import b64, noise

SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed as Prometheus parses it: (name, sorted labels) -> value."""
    with server.client() as client:
        text = client.get("/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def bucket_labels(samples, name: str) -> set[str]:
    return {dict(labels)["le"] for sample_name, labels in samples if sample_name == name + "_bucket"}


def test_requests_by_mode_both_devices_busy_errors_by_code_and_nothing_left_waiting(pool):
    before = scrape(pool)
    gates = [f"busy-{uuid.uuid4().hex[:6]}-{n}" for n in range(2)]
    with pool.client() as client, ThreadPoolExecutor(2) as threads:
        pair = [threads.submit(client.post, "/predict", json={"prompt": pool.hold(gate, f"pair {gate}"),
                                                               "request_id": gate, **SMALL}) for gate in gates]
        pool.all_held_then_released(gates)  # both generating at once: one on each device
        pair = [answer.result() for answer in pair]
        repainted = client.post("/predict", json={"prompt": "a", "image": b64(noise(256, 256)), **SMALL})
        refused = client.post("/predict", json={"prompt": "a", "width": 7})
    assert [r.status_code for r in pair] + [repainted.status_code, refused.status_code] == [200, 200, 200, 400]
    after = scrape(pool)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("sd3_generation_seconds_count", mode="txt2img") == 2
    assert delta("sd3_generation_seconds_count", mode="img2img") == 1
    assert delta("sd3_images_total", mode="txt2img") == 2 and delta("sd3_images_total", mode="img2img") == 1
    assert delta("sd3_request_errors_total", code="invalid_input") == 1
    assert delta("sd3_request_seconds_count", stage="generate") == 3 and delta("sd3_request_seconds_count",
                                                                               stage="store") == 3
    # Two requests at once on two devices: each device spent time generating, in this test.
    assert delta("sd3_device_busy_seconds_total", device="cpu:0") > 0
    assert delta("sd3_device_busy_seconds_total", device="cpu:1") > 0
    for device in ("cpu:0", "cpu:1"):
        states = {state: value(after, "sd3_device_state", device=device, state=state)
                  for state in ("loading", "ready", "failed")}
        assert states == {"loading": 0, "ready": 1, "failed": 0}, (device, states)
    assert value(after, "sd3_requests_waiting") == 0 and value(after, "sd3_requests_running") == 0
    # Buckets for seconds-long generations, not the web's milliseconds; no request id or prompt in any label.
    assert {"5.0", "30.0", "120.0"} <= bucket_labels(after, "sd3_generation_seconds")
    label_values = " ".join(value for _, sample_labels in after for _, value in sample_labels)
    sent = [answer.json()["request_id"] for answer in pair + [repainted]] + [f"pair {gate}" for gate in gates]
    assert not [text for text in sent if text in label_values]


def test_every_series_exists_from_start_up_at_zero(make_server):
    fresh = make_server({"SD3_DEVICE": "cpu,cpu"})
    samples = scrape(fresh)
    for name in ("sd3_store_failures_total", "sd3_takeovers_total", "sd3_requests_waiting", "sd3_requests_running",
                 "sd3_spooled_images", "sd3_webhook_pending"):
        assert (name, ()) in samples and samples[(name, ())] == 0, name
    from sd3_service.errors import ERROR_CODES

    for code in ERROR_CODES:
        assert samples[("sd3_request_errors_total", (("code", code),))] == 0, code
    for mode in ("txt2img", "img2img", "inpaint"):
        assert samples[("sd3_images_total", (("mode", mode),))] == 0
        assert samples[("sd3_generation_seconds_count", (("mode", mode),))] == 0
    for stage in ("queue", "inputs", "generate", "encode", "store"):
        assert samples[("sd3_request_seconds_count", (("stage", stage),))] == 0
    for operation in ("create", "read", "replace"):
        assert samples[("sd3_ledger_seconds_count", (("operation", operation),))] == 0
    for device in ("cpu:0", "cpu:1"):
        assert samples[("sd3_device_busy_seconds_total", (("device", device),))] == 0
    for outcome in ("delivered", "retried", "gave_up", "gone"):
        assert samples[("sd3_webhook_deliveries_total", (("outcome", outcome),))] == 0


def test_a_request_still_running_is_no_error_on_either_surface(pool):
    import openai

    gate = f"in-progress-{uuid.uuid4().hex[:6]}"
    before = scrape(pool)
    with pool.client() as client, ThreadPoolExecutor(1) as thread:
        held = thread.submit(client.post, "/predict", json={"prompt": pool.hold(gate), "request_id": gate, **SMALL})
        try:
            pool.wait_held(gate)
            native = client.post("/predict", json={"request_id": gate})
            with openai.OpenAI(base_url=pool.url + "/v1", api_key="unused", max_retries=0) as sdk:
                with pytest.raises(openai.ConflictError) as conflict:  # Idempotency-Key: the same request, running
                    sdk.images.generate(prompt=pool.hold(gate), size="256x256",
                                        extra_body={"num_inference_steps": 2}, extra_headers={"Idempotency-Key": gate})
        finally:
            pool.release(gate)
        assert held.result().status_code in (200, 202)  # done, or past the pool's 5 s wait
    assert native.status_code == 202 and conflict.value.code == "request_in_progress"
    after = scrape(pool)
    errors = sum(value for (name, _), value in after.items() if name == "sd3_request_errors_total") - \
        sum(value for (name, _), value in before.items() if name == "sd3_request_errors_total")
    assert errors == 0


def test_a_held_generation_is_running_and_the_ones_behind_it_wait(pool):
    gates = [f"metrics-{uuid.uuid4().hex[:6]}-{n}" for n in range(3)]
    with pool.client() as client, ThreadPoolExecutor(3) as threads:
        def send(gate):
            return client.post("/predict", json={"prompt": pool.hold(gate), **SMALL})

        try:
            answers = [threads.submit(send, gates[0])]
            pool.wait_held(gates[0])
            one = scrape(pool)
            answers.append(threads.submit(send, gates[1]))
            pool.wait_held(gates[1])
            answers.append(threads.submit(send, gates[2]))
            while value(waiting := scrape(pool), "sd3_requests_waiting") < 1:  # the third is admitted, queued
                time.sleep(0.02)
        finally:
            for gate in gates:
                pool.release(gate)
        assert [answer.result().status_code for answer in answers] == [200, 200, 200]
    assert (value(one, "sd3_requests_running"), value(one, "sd3_requests_waiting")) == (1, 0)
    assert (value(waiting, "sd3_requests_running"), value(waiting, "sd3_requests_waiting")) == (2, 1)
    done = scrape(pool)
    assert (value(done, "sd3_requests_running"), value(done, "sd3_requests_waiting")) == (0, 0)


def test_each_finished_request_is_one_json_log_line_without_its_prompt(pool):
    prompt = f"a secret prompt {uuid.uuid4().hex}"
    with pool.client() as client:
        answer = client.post("/predict", json={"prompt": prompt, **SMALL}).json()
    lines = [json.loads(line) for line in pool.log().splitlines() if line.startswith("{")]
    [finished] = [line for line in lines if line.get("event") == "request_finished"
                  and line["request_id"] == answer["request_id"]]
    assert finished["status"] == "done" and finished["mode"] == "txt2img" and finished["steps"] == 2
    assert finished["size"] == "256x256" and finished["device"] in ("cpu:0", "cpu:1")
    assert set(finished["stages_ms"]) == {"queue", "inputs", "generate", "encode", "store"}
    assert finished["level"] == "INFO" and finished["logger"] == "sd3.requests"
    assert prompt not in pool.log()
