"""Image to image and inpainting through the real server (`bentoml serve`, tiny model, local store)."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

from image_samples import b64, file_bytes, left_half_mask, noise
from integration.test_service import file_of, predict

# At the default strength 0.8, 5 steps start from the input noised to step 1 of 5; with fewer, every step runs
# and the first, at full noise, leaves nothing of the input.
STEPS = {"num_inference_steps": 5}
START = noise(320, 256)  # sides already multiples of 16: the output is the input's size, unresized


def generate(server, **fields) -> dict:
    response = predict(server, {"prompt": "a lighthouse at dusk", "seed": 5, **STEPS, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def pixels(image: dict) -> np.ndarray:
    return np.asarray(Image.open(file_of(image)).convert("RGB"), dtype=np.int16)


def test_img2img_answers_at_the_inputs_size_rounded_down_to_16(server):
    answer = generate(server, image=b64(noise(330, 300)))
    [image] = answer["images"]
    assert (image["width"], image["height"]) == (320, 288)
    assert Image.open(file_of(image)).size == (320, 288)


def test_an_explicit_size_wins_over_the_inputs(server):
    [image] = generate(server, image=b64(START), width=256, height=384)["images"]
    assert (image["width"], image["height"]) == Image.open(file_of(image)).size == (256, 384)


def test_same_seed_and_input_same_bytes_and_each_change_other_bytes(server):
    def sha(**fields) -> str:
        return generate(server, **fields)["images"][0]["sha256"]

    first = sha(image=b64(START))
    assert sha(image="data:image/png;base64," + b64(START)) == first  # the data: URL form is the same input
    assert sha(image=b64(noise(320, 256, seed=1))) != first
    assert sha(image=b64(START), strength=0.5) != first
    assert sha(image=b64(START), seed=6) != first


def test_inpainting_keeps_what_is_outside_the_mask_and_repaints_inside(server):
    start = np.asarray(START, dtype=np.int16)
    [image] = generate(server, image=b64(START), mask_image=b64(left_half_mask(320, 256)), strength=1.0)["images"]
    result = pixels(image)
    inside = np.abs(result[:, :160] - start[:, :160]).mean()
    outside = np.abs(result[:, 160:] - start[:, 160:]).mean()
    assert outside < inside, (outside, inside)
    assert outside == 0  # the kept area is the input's own pixels, not a trip through the VAE


def test_several_images_in_every_format(server):
    for output_format in ("png", "jpeg", "webp"):
        answer = generate(server, image=b64(START), mask_image=b64(left_half_mask(320, 256)), num_images=2,
                          output_format=output_format)
        assert len(answer["images"]) == 2
        for image in answer["images"]:
            decoded = Image.open(file_of(image))
            assert decoded.format == output_format.upper() and decoded.size == (320, 256)


def test_img2img_route_answers_the_image_bytes(server):
    with server.client() as client:
        response = client.post("/img2img", json={"prompt": "a lighthouse", "image": b64(START), "seed": 9, **STEPS})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.headers["x-seed"] == "9"
    assert Image.open(io.BytesIO(response.content)).size == (320, 256)
    # The same request on /predict makes the same image.
    [image] = generate(server, image=b64(START), seed=9, prompt="a lighthouse")["images"]
    assert image["sha256"] == hashlib.sha256(response.content).hexdigest()


def _bomb() -> bytes:
    """A small PNG that decodes to 25 million pixels."""
    return file_bytes(Image.new("1", (5000, 5000)))


GOOD = b64(START)
BAD_INPUTS = {
    "not base64": ({"image": "this is not base64!"}, "image", "not base64"),
    "a data: URL that is not base64": ({"image": "data:image/png,raw"}, "image", "base64"),
    "not an image": ({"image": b64(b"just some text, no pixels")}, "image", "not an image"),
    "random bytes": ({"image": b64(os.urandom(4096))}, "image", "not an image"),
    "a format the service does not take": ({"image": b64(START, "GIF")}, "image", "PNG, JPEG or WEBP"),
    "a PNG cut short": ({"image": b64(file_bytes(START)[:5000])}, "image", "cannot be decoded"),
    "a side over 1536": ({"image": b64(noise(1552, 256))}, "image", "256 to 1536"),
    "a side under 256": ({"image": b64(noise(255, 300))}, "image", "256 to 1536"),
    "a decompression bomb": ({"image": b64(_bomb())}, "image", "pixels"),
    "a mask without an image": ({"mask_image": b64(left_half_mask(320, 256))}, "mask_image", "needs a valid `image`"),
    "a mask of another size": ({"image": GOOD, "mask_image": b64(left_half_mask(256, 256))}, "mask_image",
                               "256x256 but the image is 320x256"),
    "a mask that is not an image": ({"image": GOOD, "mask_image": b64(b"nope")}, "mask_image", "not an image"),
    "strength 0": ({"image": GOOD, "strength": 0}, "strength", "greater than 0"),
    "strength over 1": ({"image": GOOD, "strength": 1.01}, "strength", "less than or equal to 1"),
    "strength without an image": ({"strength": 0.5}, "strength", "only with `image`"),
    "a malformed oci:// URI": ({"image": "oci://just-a-bucket"}, "image", "oci://<bucket>@<namespace>"),
    "an oci:// input when no bucket is allowed": ({"image": "oci://images@ns/a.png"}, "image", "allowed: none"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_a_400_naming_the_field(server, case):
    fields, field, words = BAD_INPUTS[case]
    response = predict(server, {"prompt": "a lighthouse", **STEPS, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and error["field"] == field, error
    assert words in error["message"], error


def test_the_img2img_route_needs_an_image_and_checks_it(server):
    with server.client() as client:
        missing = client.post("/img2img", json={"prompt": "a lighthouse"})
        small = client.post("/img2img", json={"prompt": "a lighthouse", "image": b64(noise(128, 128))})
    assert missing.status_code == 400 and missing.json()["error"]["message"] == "'image' is required"
    assert small.status_code == 400 and small.json()["error"]["field"] == "image"


def test_an_image_over_the_body_limit_is_413(server):
    response = predict(server, {"prompt": "a lighthouse", "image": b64(os.urandom(8 * 1024 * 1024))})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_the_smallest_strength_still_repaints_one_step(server):
    # 1e-9 of 5 steps is none; the least the pipelines run is one, and the answer is an image, not an error.
    answer = generate(server, image=b64(START), strength=1e-9)
    assert answer["images"][0]["width"] == 320
