"""Run the pipeline and encode its images: plain functions, called by the engine."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sd3_service.contract import CONTENT_TYPES, PredictRequest
from sd3_service.inputs import NO_INPUTS, Inputs

try:  # the fast PNG writer is optional: without it PNGs come from Pillow, slower but identical pixels
    import fpng
except ImportError:
    fpng = None


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str
    extension: str
    sha256: str
    width: int
    height: int


def generate_images(pipe, *, prompt: str, negative_prompt: str | None, num_inference_steps: int,
                    guidance_scale: float, width: int, height: int, num_images: int, seed: int,
                    image=None, mask_image=None, strength: float | None = None,
                    on_step: Callable[[int, int], None] | None = None) -> list:
    """Generate `num_images` PIL images; the same seed, parameters and inputs give the same images.

    `pipe` is the text-to-image pipeline, or with `image` the image-to-image one, or with `image` and
    `mask_image` the inpainting one; `image` and `mask_image` are PIL images already at `width`x`height`.
    `on_step(step, steps)` is called after each denoising step. Inpainted images still need
    `keep_outside_mask`.
    """
    import torch

    starting = {} if image is None else {"image": image, "strength": strength}
    if mask_image is not None:
        starting["mask_image"] = mask_image
    if on_step is not None:
        def step_ended(pipeline, index, timestep, tensors):
            on_step(index + 1, pipeline.num_timesteps)  # the steps that run: fewer than asked below strength 1
            return tensors

        starting["callback_on_step_end"] = step_ended
    # A CPU generator gives the same noise on every device, so a seed means the same image everywhere.
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        result = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            num_images_per_prompt=num_images,
            generator=generator,
            **starting,
        )
    return result.images


def keep_outside_mask(images: list, inputs: Inputs) -> list:
    """Inpainted images with the input's own pixels pasted back where the (black and white) mask is black.

    The pipeline repaints in latent space, so even the area it keeps comes back through the VAE, slightly
    changed; pasting the original back keeps what the client did not ask to change exactly as sent.
    """
    from PIL import Image

    return [Image.composite(image, inputs.image.pixels, inputs.mask.pixels) for image in images]


def generation_arguments(request: PredictRequest, inputs: Inputs = NO_INPUTS) -> dict:
    """The keyword arguments of `generate_images` that a request asks for (all but the seed)."""
    arguments = {"prompt": request.prompt, "negative_prompt": request.negative_prompt,
                 "num_inference_steps": request.num_inference_steps, "guidance_scale": request.guidance_scale,
                 "width": request.width, "height": request.height, "num_images": request.num_images}
    if inputs.image is not None:
        arguments.update(image=inputs.image.pixels, strength=at_least_one_step(inputs.strength,
                                                                               request.num_inference_steps),
                         mask_image=inputs.mask.pixels if inputs.mask is not None else None)
    return arguments


def at_least_one_step(strength: float, steps: int) -> float:
    """`strength`, or the least one that repaints one step where it would repaint none (the pipelines run the
    last `steps - int(steps - steps * strength)` steps, and refuse to run zero)."""
    return strength if steps - int(max(steps - steps * strength, 0)) >= 1 else 1 / steps


def encode_png(image) -> bytes:
    """Lossless PNG: fpng when installed (4-5 ms for 1024x1024 RGB against 60-120 ms for Pillow at level 1,
    files 13-20% larger; docs/benchmarks.md), else Pillow at its fastest compression level."""
    if fpng is not None and image.mode in ("RGB", "RGBA"):
        return fpng.from_ndarray(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_image(image, output_format: str) -> EncodedImage:
    """Encode a PIL image as PNG (lossless, fast), JPEG or WebP (quality 95)."""
    if output_format == "png":
        data = encode_png(image)
    else:
        buffer = io.BytesIO()
        if output_format == "jpeg":
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
        else:
            image.save(buffer, format="WEBP", quality=95)
        data = buffer.getvalue()
    return EncodedImage(
        data=data, content_type=CONTENT_TYPES[output_format], extension=output_format,
        sha256=hashlib.sha256(data).hexdigest(), width=image.width, height=image.height,
    )
