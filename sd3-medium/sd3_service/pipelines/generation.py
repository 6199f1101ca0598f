"""Run a pipeline for one request: plain functions, called on a device's worker thread (and the engine)."""

from __future__ import annotations

from collections.abc import Callable

from sd3_service.spec import NO_INPUTS, ImageRequest, Inputs


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


def generation_arguments(request: ImageRequest, inputs: Inputs = NO_INPUTS) -> dict:
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


def is_device_failure(exc: BaseException) -> bool:
    """Whether an error means the device itself is gone (a CUDA error), not just this request (say, out of memory)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or "CUDA error" in str(exc)
