"""Starting images as clients send them: the forms and encodings a phone, a browser or `base64` produce."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from image_samples import b64, file_bytes, noise
from sd3_service.api.native.models import PredictRequest, to_image_request
from sd3_service.errors import ServiceError
from sd3_service.inputs import InputReader


def prepare(**fields):
    return InputReader().prepare(to_image_request(PredictRequest.model_validate({"prompt": "a lighthouse", **fields})))


def test_a_phone_jpeg_stored_sideways_is_read_upright():
    sideways = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to show
    noise(288, 400).save(sideways, format="JPEG", exif=exif)
    request, inputs = prepare(image=b64(sideways.getvalue()))
    assert (inputs.image.width, inputs.image.height) == (400, 288)
    assert (request.width, request.height) == (400, 288) and inputs.image.pixels.size == (400, 288)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_any_pixel_mode_becomes_rgb(mode):
    _, inputs = prepare(image=b64(noise(256, 256).convert(mode)))
    assert inputs.image.pixels.mode == "RGB"


def test_base64_wrapped_at_76_columns_is_accepted():
    wrapped = base64.encodebytes(file_bytes(noise(256, 256))).decode()  # what `base64` writes without -w0
    assert "\n" in wrapped
    _, inputs = prepare(image=wrapped)
    assert inputs.image.format == "PNG"


def test_the_output_size_is_the_inputs_unless_given_and_inputs_are_resized_to_it():
    request, inputs = prepare(image=b64(noise(1000, 700, seed=3), "WEBP"), height=512)
    assert (request.width, request.height) == (992, 512)  # width from the input, rounded down; height as sent
    assert inputs.image.pixels.size == (992, 512) and (inputs.image.width, inputs.image.height) == (1000, 700)
    assert inputs.image.format == "WEBP" and inputs.strength == 0.8


def test_text_to_image_reads_nothing():
    request, inputs = prepare(width=512)
    assert inputs.image is None and request.width == 512


def test_an_oci_input_without_an_allowed_bucket_is_refused_before_any_call():
    with pytest.raises(ServiceError) as refused:
        prepare(image="oci://images@ns/start.png")
    assert (refused.value.status, refused.value.field) == (400, "image")
