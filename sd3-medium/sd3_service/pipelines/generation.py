"""Run a pipeline for one request: plain functions, called on a device's worker thread (and the engine)."""

from __future__ import annotations

from collections.abc import Callable

from sd3_service.spec import NO_INPUTS, ImageRequest, Inputs


def generate_images(pipe, *, prompt: str, negative_prompt: str | None, num_inference_steps: int,
                    guidance_scale: float, width: int, height: int, num_images: int, seed: int,
                    image=None, mask_image=None, strength: float | None = None,
                    on_step: Callable[[int, int], None] | None = None, previews: int = 0,
                    on_preview: Callable[[int, int, int, list], None] | None = None) -> list:
    """Generate `num_images` PIL images; the same seed, parameters and inputs give the same images.

    `pipe` is the text-to-image pipeline, or with `image` the image-to-image one, or with `image` and
    `mask_image` the inpainting one; `image` and `mask_image` are PIL images already at `width`x`height`.
    `on_step(step, steps)` is called after each denoising step; `on_preview(index, step, steps, images)` with
    each of `previews` estimates of the final images (see `preview_steps`, `estimate_images`). Inpainted images
    still need `keep_outside_mask`.
    """
    import torch

    starting = {} if image is None else {"image": image, "strength": strength}
    if mask_image is not None:
        starting["mask_image"] = mask_image
    if on_step is not None or (previews and on_preview is not None):
        wanted: list[int] | None = None
        previous = None  # the latents one step back, when a preview needs them

        def step_ended(pipeline, index, timestep, tensors):
            nonlocal wanted, previous
            step, steps = index + 1, pipeline.num_timesteps  # the steps that run: fewer than asked below strength 1
            if on_step is not None:
                on_step(step, steps)
            if previews and on_preview is not None:
                wanted = preview_steps(previews, steps) if wanted is None else wanted
                latents = tensors["latents"]
                if step in wanted and previous is not None:
                    on_preview(wanted.index(step), step, steps, estimate_images(pipeline, previous, latents))
                previous = latents.clone() if step + 1 in wanted else None
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


def preview_steps(previews: int, steps: int) -> list[int]:
    """After which steps to show `previews` estimates: evenly spaced, never after the first step (an estimate needs
    two steps' latents) nor the last (that is the image itself); fewer when there are too few steps."""
    chosen = (min(max(round(steps * (index + 1) / (previews + 1)), 2), steps - 1) for index in range(previews))
    return sorted({step for step in chosen if 2 <= step < steps})


def estimate_images(pipeline, previous, latents) -> list:
    """The final images as the model sees them now, decoded: for flow matching, the latents minus sigma times the
    velocity, the velocity read off the last Euler step (latents now and one step back, at their sigmas)."""
    import torch

    with torch.inference_mode():
        sigmas, index = pipeline.scheduler.sigmas, pipeline.scheduler.step_index  # the sigma of `latents`
        sigma, sigma_before = float(sigmas[index]), float(sigmas[index - 1])
        velocity = (latents.float() - previous.float()) / (sigma - sigma_before)
        estimate = latents.float() - sigma * velocity
        vae = pipeline.vae
        estimate = estimate / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(estimate.to(vae.dtype), return_dict=False)[0]
        return pipeline.image_processor.postprocess(decoded, output_type="pil")


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
