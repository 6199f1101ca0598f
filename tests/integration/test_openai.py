"""The OpenAI Images API, driven by the official `openai` SDK against the real server (tiny model, local store)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from image_samples import b64, file_bytes, noise
from integration.test_service import file_of, predict
from testbed.fakes import oci_common
from testbed.fakes.model_deployment import FakeModelDeployment

REPO = Path(__file__).resolve().parents[2]
FAST = {"num_inference_steps": 2, "seed": 5}
START = noise(320, 256)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    """The SDK as a user makes it for a local server (no retries: each test says what it expects)."""
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as made:
        yield made


def decoded(data) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data.b64_json)))


def transparent_left_half(width: int, height: int) -> bytes:
    """An OpenAI mask: fully transparent (edit here) on the left half, opaque on the right."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return file_bytes(mask)


def test_generate_n_images_of_a_size_as_jpeg_stored_as_predict_stores_them(client, server):
    raw = client.images.with_raw_response.generate(prompt="two boats", n=2, size="320x256", output_format="jpeg",
                                                    output_compression=80, extra_body=FAST)
    result = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert (result.size, result.output_format, len(result.data)) == ("320x256", "jpeg", 2)
    images = [decoded(item) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("JPEG", (320, 256))] * 2
    assert all(item.revised_prompt is None and item.url is None for item in result.data)
    # Stored exactly as /predict stores them, under the request id the answer names; the record answers a poll.
    polled = predict(server, {"request_id": request_id})
    assert polled.status_code == 200, polled.text
    stored = [file_of(image).read_bytes() for image in polled.json()["images"]]
    assert stored == [base64.b64decode(item.b64_json) for item in result.data]
    assert [image["object_name"].rsplit("/", 1)[1] for image in polled.json()["images"]] == \
        [f"{request_id}-0.jpeg", f"{request_id}-1.jpeg"]


def test_size_auto_is_1024_square(client):
    result = client.images.generate(prompt="a kite", size="auto", extra_body={"num_inference_steps": 1})
    assert decoded(result.data[0]).size == (1024, 1024) and result.size == "1024x1024"


def test_the_same_idempotency_key_answers_the_same_image_without_generating_again(client, server):
    key = uuid.uuid4().hex
    ask = dict(prompt="a lighthouse", size="256x256", extra_body=FAST, extra_headers={"Idempotency-Key": key})
    first, again = client.images.generate(**ask), client.images.generate(**ask)
    assert first.data[0].b64_json == again.data[0].b64_json
    assert server.log().count(f"[{key}] Generating on") == 1
    with pytest.raises(openai.ConflictError) as reused:  # the same key with other parameters
        client.images.generate(**{**ask, "n": 2})
    assert reused.value.code == "request_id_reused" and reused.value.param == "n"
    assert reused.value.response.headers["x-should-retry"] == "false"


def test_an_edit_with_an_openai_mask_keeps_every_pixel_outside_it(client):
    result = client.images.edit(image=("start.png", file_bytes(START), "image/png"),
                                mask=("mask.png", transparent_left_half(320, 256), "image/png"),
                                prompt="a lighthouse at dusk", extra_body={**FAST, "num_inference_steps": 5,
                                                                           "strength": 1.0})
    edited = np.asarray(decoded(result.data[0]).convert("RGB"), dtype=np.int16)
    start = np.asarray(START, dtype=np.int16)
    assert edited.shape == start.shape and result.size == "320x256"  # `size` absent: the input's
    assert np.array_equal(edited[:, 160:], start[:, 160:])  # opaque in the mask: exactly as sent
    assert np.abs(edited[:, :160] - start[:, :160]).mean() > 10  # transparent: repainted


def test_an_edit_without_a_mask_is_image_to_image_and_the_same_request_on_predict_makes_the_same_bytes(client, server):
    result = client.images.edit(image=("start.png", file_bytes(START), "image/png"), prompt="a lighthouse",
                                extra_body={**FAST, "num_inference_steps": 5, "strength": 0.6})
    data = base64.b64decode(result.data[0].b64_json)
    assert Image.open(io.BytesIO(data)).size == (320, 256)
    native = predict(server, {"prompt": "a lighthouse", "image": b64(START), "strength": 0.6, "seed": 5,
                              "num_inference_steps": 5})
    assert native.json()["images"][0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_quality_sets_the_steps_unless_they_are_sent(client, server):
    key, sent = uuid.uuid4().hex, uuid.uuid4().hex
    client.images.generate(prompt="a kite", size="256x256", quality="low", extra_headers={"Idempotency-Key": key})
    assert re.search(rf"\[{key}\] Generated 1 image\(s\) 256x256 \(txt2img\), 14 steps", server.log())
    client.images.generate(prompt="a kite", size="256x256", quality="low", extra_body={"num_inference_steps": 3},
                           extra_headers={"Idempotency-Key": sent})
    assert re.search(rf"\[{sent}\] Generated 1 image\(s\) 256x256 \(txt2img\), 3 steps", server.log())


def _generate(client, **fields):
    return client.images.generate(**{"prompt": "a kite", "size": "256x256", "extra_body": FAST, **fields})


def _edit(client, image=None, **fields):
    image = image if image is not None else ("start.png", file_bytes(START), "image/png")
    return client.images.edit(image=image, **{"prompt": "a kite", "extra_body": FAST, **fields})


BAD = {
    "n over 4": (lambda c: _generate(c, n=5), openai.BadRequestError, "n"),
    "a size off the grid": (lambda c: _generate(c, size="1000x1000"), openai.BadRequestError, "size"),
    "a size too small": (lambda c: _generate(c, size="128x128"), openai.BadRequestError, "size"),
    "not a size": (lambda c: _generate(c, size="big"), openai.BadRequestError, "size"),
    "links from a local store": (lambda c: _generate(c, response_format="url"), openai.BadRequestError,
                                 "response_format"),
    "a transparent background": (lambda c: _generate(c, background="transparent"), openai.BadRequestError,
                                 "background"),
    "compression over 100": (lambda c: _generate(c, output_format="webp", output_compression=101),
                             openai.BadRequestError, "output_compression"),
    "an unknown quality": (lambda c: _generate(c, quality="ultra"), openai.BadRequestError, "quality"),
    "another model": (lambda c: _generate(c, model="gpt-image-1"), openai.NotFoundError, "model"),
    "an empty prompt": (lambda c: _generate(c, prompt=""), openai.BadRequestError, "prompt"),
    "a prompt of blanks": (lambda c: _generate(c, prompt=" \n "), openai.BadRequestError, "prompt"),
    "an unknown field": (lambda c: _generate(c, extra_body={"colour": "red"}), openai.BadRequestError, "colour"),
    "zero steps": (lambda c: _generate(c, extra_body={"num_inference_steps": 0}), openai.BadRequestError,
                   "num_inference_steps"),
    "a malformed Idempotency-Key": (lambda c: _generate(c, extra_headers={"Idempotency-Key": "not a key!"}),
                                    openai.BadRequestError, "Idempotency-Key"),
    "two images to edit": (lambda c: _edit(c, image=[("a.png", file_bytes(START), "image/png")] * 2),
                           openai.BadRequestError, "image"),
    "an image that is not one": (lambda c: _edit(c, image=("a.png", b"not an image", "image/png")),
                                 openai.BadRequestError, "image"),
    "a mask of another size": (lambda c: _edit(c, mask=("m.png", transparent_left_half(256, 256), "image/png")),
                               openai.BadRequestError, "mask"),
    "a mask without alpha": (lambda c: _edit(c, mask=("m.png", file_bytes(Image.new("L", (320, 256))), "image/png")),
                             openai.BadRequestError, "mask"),
    "strength 0": (lambda c: _edit(c, extra_body={"strength": 0}), openai.BadRequestError, "strength"),
    "steps as words": (lambda c: _edit(c, extra_body={"num_inference_steps": "ten"}), openai.BadRequestError,
                       "num_inference_steps"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_raises_the_sdks_error_naming_the_param(client, case):
    call, error_class, param = BAD[case]
    with pytest.raises(error_class) as raised:
        call(client)
    assert raised.value.param == param, raised.value.body
    assert raised.value.type in ("invalid_request_error",) and raised.value.code
    assert raised.value.response.headers["x-should-retry"] == "false"


def test_an_edit_without_an_image_names_it(server):
    response = httpx.post(server.url + "/v1/images/edits", data={"prompt": "a kite"}, files={"mask": b"x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image", response.text
    malformed = httpx.post(server.url + "/v1/images/generations", content=b"[" * 1500 + b"]" * 1500)
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "malformed_json", malformed.text


def test_a_full_queue_raises_rate_limit_error_with_retry_after(client, server):
    # One request runs (held at its gate) and four wait: the most a waiting caller may wait behind (MAX_QUEUE=4).
    gates = [f"queue-{uuid.uuid4().hex[:8]}-{index}" for index in range(5)]
    for gate in gates:
        accepted = predict(server, {"prompt": server.hold(gate), "request_id": gate, "wait": False, "width": 256,
                                    "height": 256, "num_inference_steps": 2})
        assert accepted.status_code == 202, accepted.text
    try:
        server.wait_held(gates[0])
        with pytest.raises(openai.RateLimitError) as refused:
            _generate(client)
        assert refused.value.code == "queue_full" and int(refused.value.response.headers["retry-after"]) >= 1
    finally:
        for gate in gates:
            server.release(gate)
    for gate in gates:  # done before the next test needs the queue
        with server.client() as polling:
            while polling.post("/predict", json={"request_id": gate}).status_code == 202:
                time.sleep(0.02)


def test_models_lists_the_model_really_served_and_answers_to_its_id(pool):
    client = openai.OpenAI(base_url=pool.url + "/v1", api_key="unused", max_retries=0)  # no SERVED_MODEL_NAMES
    assert [(model.id, model.object) for model in client.models.list()] == [("sd3-tiny", "model")]
    assert client.models.retrieve("sd3-tiny").id == "sd3-tiny"
    assert _generate(client, model="sd3-tiny").data  # and it may be named
    with pytest.raises(openai.NotFoundError) as other:
        client.models.retrieve("sd3-medium")  # the tiny model is not called sd3-medium
    assert other.value.code == "model_not_found" and "`sd3-tiny`" in other.value.message


class Answers:
    """What the SDK really received, seen on the client side: the server's access log may lag the answer."""

    def __init__(self):
        self.statuses: list[int] = []
        self.conflict = threading.Event()

    def _seen(self, response: httpx.Response) -> None:
        self.statuses.append(response.status_code)
        if response.status_code == 409:
            self.conflict.set()

    def sdk(self, server, max_retries: int) -> openai.OpenAI:
        http = httpx.Client(timeout=120, event_hooks={"response": [self._seen]})
        return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=max_retries,
                             http_client=http)


def test_a_request_past_the_wait_completes_through_the_sdks_own_retries(pool):
    # `pool` answers a waiting caller after SYNC_WAIT_SECONDS=5: the first try meets a held generation.
    key, gate = uuid.uuid4().hex, f"retry-{uuid.uuid4().hex[:8]}"
    outcome, answers = {}, Answers()
    with answers.sdk(pool, max_retries=2) as retrying:
        caller = threading.Thread(target=lambda: outcome.update(result=retrying.images.generate(
            prompt=pool.hold(gate), size="256x256", extra_body=FAST, extra_headers={"Idempotency-Key": key})))
        caller.start()
        pool.wait_held(gate)
        answers.conflict.wait(120)  # the first try answered 409, which the SDK retries
        pool.release(gate)
        caller.join(120)
    assert decoded(outcome["result"].data[0]).size == (256, 256)
    assert pool.log().count(f"[{key}] Generating on") == 1  # the retries collected the one generation
    assert answers.statuses[0] == 409 and answers.statuses[-1] == 200, answers.statuses


def test_without_a_key_the_sdk_is_told_not_to_retry_and_the_request_id_to_poll(pool):
    gate = f"keyless-{uuid.uuid4().hex[:8]}"
    answers = Answers()
    with answers.sdk(pool, max_retries=2) as retrying:
        try:
            with pytest.raises(openai.ConflictError) as running:
                retrying.images.generate(prompt=pool.hold(gate), size="256x256", extra_body=FAST)
        finally:
            pool.release(gate)
    assert running.value.response.headers["x-should-retry"] == "false"
    request_id = running.value.response.headers["x-request-id"]
    assert f'{{"request_id": "{request_id}"}}' in running.value.message and "Idempotency-Key" in running.value.message
    assert answers.statuses == [409]  # no retry was sent
    with pool.client() as polling:
        while (answer := polling.post("/predict", json={"request_id": request_id})).status_code == 202:
            pass
    assert answer.status_code == 200 and answer.json()["images"][0]["width"] == 256


def test_the_readmes_openai_call_gets_its_image(server, tmp_path):
    readme = (REPO / "README.md").read_text()
    script = re.search(r"OpenAI Images API.*?```python\n(.*?)```", readme, re.S)[1]
    script = script.replace("http://127.0.0.1:3000", server.url)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "outputs" / "lighthouse.png").size == (512, 512)


def test_the_docs_openai_example_signs_its_calls_and_gets_its_image(server, tmp_path):
    readme = (REPO / "docs" / "openai.md").read_text()
    script = re.search(r"```python\n(.*?)```", readme, re.S)[1]
    credentials = oci_common.api_key(tmp_path / ".oci")  # ~/.oci/config, as `oci setup config` writes it
    with FakeModelDeployment(server.url) as deployment:
        deployment.trust(credentials)
        result = subprocess.run([sys.executable, "-c", f"endpoint = {deployment.deployment_endpoint!r}\n" + script],
                                cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)}, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        calls = deployment.seen("POST", "/predict/v1/images/generations")
    assert calls and all(call.key_id == credentials.key_id and call.status == 200 for call in calls)
    assert Image.open(tmp_path / "outputs" / "lighthouse.png").format == "PNG"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".oci", "outputs"]  # nothing else written
