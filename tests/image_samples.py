"""Input images for the image-to-image and inpainting tests, made here (nothing downloaded)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of random pixels: every input made with another seed is another image."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def left_half_mask(width: int, height: int) -> Image.Image:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def file_bytes(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def b64(image: Image.Image | bytes, image_format: str = "PNG") -> str:
    data = image if isinstance(image, bytes) else file_bytes(image, image_format)
    return base64.b64encode(data).decode("ascii")
