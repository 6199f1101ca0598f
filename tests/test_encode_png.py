"""encoding.encode_image's PNG path: fpng when installed, Pillow otherwise, the same pixels either way."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sd3_service.storage import encoding
from sd3_service.storage.encoding import encode_image

RNG = np.random.default_rng(5)
IMAGES = {
    "noise RGB 1024": Image.fromarray(RNG.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)),
    "gradient RGB odd size": Image.fromarray(
        np.dstack([np.tile(np.arange(33, dtype=np.uint8) * 7, (17, 1))] * 3)),
    "flat RGB": Image.new("RGB", (256, 256), (12, 200, 99)),
    "noise RGBA": Image.fromarray(RNG.integers(0, 256, (64, 48, 4), dtype=np.uint8)),
    "grey L (Pillow path)": Image.fromarray(RNG.integers(0, 256, (40, 30), dtype=np.uint8)),
}


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("encoder", ["installed", "pillow fallback"])
def test_png_round_trips_exactly(name, encoder, monkeypatch):
    if encoder == "pillow fallback":
        monkeypatch.setattr(encoding, "fpng", None)
    image = IMAGES[name]
    encoded = encode_image(image, "png")
    back = decoded(encoded.data)
    assert back.format == "PNG" and back.mode == image.mode and back.size == image.size
    assert np.array_equal(np.asarray(back), np.asarray(image))
    assert (encoded.content_type, encoded.extension, encoded.width, encoded.height) == (
        "image/png", "png", image.width, image.height)


def test_fpng_is_the_encoder_when_installed():
    # fpng is a pinned runtime dependency (pyproject.toml): the fast path is what the service runs.
    assert encoding.fpng is not None
    image = IMAGES["noise RGB 1024"]
    assert encode_image(image, "png").data == encoding.fpng.from_ndarray(np.asarray(image))


def test_same_image_same_bytes():
    image = IMAGES["gradient RGB odd size"]
    assert encode_image(image, "png").sha256 == encode_image(image.copy(), "png").sha256
