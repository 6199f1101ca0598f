"""Run the pipeline and encode its images: plain functions, called by the engine."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from sd3_service.contract import CONTENT_TYPES, PredictRequest


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str
    extension: str
    sha256: str
    width: int
    height: int


def generate_images(pipe, request: PredictRequest, seed: int, device: str) -> list:
    """Generate `request.num_images` PIL images; the same seed and request give the same images."""
    import torch

    # A CPU generator gives the same noise on every device, so a seed means the same image everywhere.
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        result = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            num_images_per_prompt=request.num_images,
            generator=generator,
        )
    return result.images


def encode_image(image, output_format: str) -> EncodedImage:
    """Encode a PIL image as PNG (lossless, fast setting), JPEG or WebP (quality 95)."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="WEBP", quality=95)
    data = buffer.getvalue()
    return EncodedImage(
        data=data, content_type=CONTENT_TYPES[output_format], extension=output_format,
        sha256=hashlib.sha256(data).hexdigest(), width=image.width, height=image.height,
    )
