"""The OpenAI Images API's wire models, as the official `openai` SDK sends and reads them, and their mapping.

`POST /v1/images/generations` takes JSON (`GenerationBody`), `POST /v1/images/edits` a multipart form
(`EditForm`, every value a string there); both become the engine's `ImageRequest` in `to_image_request`.
This model's own knobs ride as extension fields (the SDK's `extra_body`). Field names in errors are the
API's (`n`, `size`, `mask`), see `WIRE_NAMES`.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sd3_service.spec import (DEFAULT_SIDE, LORAS_DESCRIPTION, MAX_GUIDANCE, MAX_IMAGES, MAX_LORAS, MAX_PROMPT_CHARS,
                              MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_SIDE, SIDE_STEP, ImageRequest, LoraSpec, Prompt)

SERVED_MODEL = "sd3-medium"  # the id `GET /v1/models` lists and `model` may name
SIZE = re.compile(r"^(?P<width>\d{1,5})x(?P<height>\d{1,5})$")
# `quality` sets the denoising steps when `num_inference_steps` is not sent.
QUALITY_STEPS = {"low": 14, "medium": 28, "standard": 28, "auto": 28, "high": 40, "hd": 40, "xhigh": 45, "max": 50}
# The engine's names for the fields this API names otherwise (errors name the field as the caller sent it).
WIRE_NAMES = {"num_images": "n", "width": "size", "height": "size", "mask_image": "mask",
              "output_quality": "output_compression"}


def parse_size(size: str) -> tuple[int, int] | None:
    """`WxH` as (width, height) within this service's bounds, `auto` as None; `ValueError` saying what is allowed."""
    if size == "auto":
        return None
    match = SIZE.match(size)
    allowed = (f"`auto` or `WxH` with each side {MIN_SIDE} to {MAX_SIDE} and a multiple of {SIDE_STEP} "
               f"(such as 1024x1024, 1536x1024, 768x1344)")
    if match is None:
        raise ValueError(f"'{size}' is not a size: use {allowed}")
    width, height = int(match["width"]), int(match["height"])
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_STEP:
            raise ValueError(f"{width}x{height} is outside what this model makes: use {allowed}")
    return width, height


class ImageOptions(BaseModel):
    """What both routes take: the OpenAI fields, and this model's own as extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt = Field(..., description="What to draw.")
    model: str | None = Field(None, description=f"`{SERVED_MODEL}` (the one model served), or absent.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="How many images to make.")
    size: str | None = Field(None, pattern=r"^(auto|\d{1,5}x\d{1,5})$",
                             description="`WxH`, each side 256 to 1536 and a multiple of 16, or `auto`.")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="`b64_json` (the image in the answer), or `url`: a time-limited read-only link, "
                                "where the deployment makes them (`RETURN_URL` with a bucket).")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG and WebP quality, 0 to 100 (95 "
                                                                           "when absent); PNG is lossless.")
    quality: Literal["auto", "low", "medium", "high", "standard", "hd", "xhigh", "max"] | None = Field(
        None, description="Sets the denoising steps when `num_inference_steps` is not sent: low 14; auto, "
                          "standard and medium 28; high and hd 40; xhigh 45; max 50.")
    background: Literal["auto", "opaque"] | None = Field(
        None, description="`auto` or `opaque`; this model makes no transparent images.")
    user: str | None = Field(None, max_length=256, description="Your end user's id; kept only as its sha256.")
    # Extensions (the SDK's `extra_body`)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="What to keep out of the "
                                                                                         "image.")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Denoising steps (28 unless "
                                                                                  "`quality` says otherwise).")
    guidance_scale: float = Field(7.0, ge=0, le=MAX_GUIDANCE, description="How strongly to follow the prompt (CFG).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; the same seed and parameters give "
                                                                  "the same image.")
    loras: list[LoraSpec] | None = Field(None, max_length=MAX_LORAS, description=LORAS_DESCRIPTION)

    @field_validator("size")
    @classmethod
    def _size(cls, size: str | None) -> str | None:
        if size is not None:
            parse_size(size)
        return size

    @field_validator("background", mode="before")
    @classmethod
    def _opaque(cls, background):
        if background == "transparent":
            raise ValueError("'transparent' is not available: Stable Diffusion 3 makes opaque images; use `auto` "
                             "or `opaque`")
        return background


class GenerationBody(ImageOptions):
    """The JSON body of `POST /v1/images/generations`."""

    model_config = ConfigDict(extra="forbid", strict=True)


class FormLora(LoraSpec):
    """An adapter as a form sends it (`loras[][name]`, `loras[][scale]`): its scale is text."""

    model_config = ConfigDict(extra="forbid", strict=False)


class EditForm(ImageOptions):
    """The form fields of `POST /v1/images/edits` besides its files (`image`, `mask`): strings, read as numbers
    where the field is one."""

    model_config = ConfigDict(extra="forbid", strict=False)

    loras: list[FormLora] | None = Field(None, max_length=MAX_LORAS, description=LORAS_DESCRIPTION)
    strength: float | None = Field(None, gt=0, le=1, description="How much of `image` to repaint, 0 < strength <= "
                                                                 "1 (0.8 when absent).")


class ImageData(BaseModel):
    b64_json: str | None = Field(None, exclude_if=lambda v: v is None, description="the image file, base64")
    url: str | None = Field(None, exclude_if=lambda v: v is None, description="a time-limited read-only link")
    revised_prompt: str | None = Field(None, description="always null: the prompt is used as sent")


class ImagesResponse(BaseModel):
    """What both routes answer: one entry in `data` per image (`b64_json` or `url`), in order."""

    created: int = Field(..., description="seconds since the epoch")
    data: list[ImageData]
    output_format: str
    size: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(..., description="`invalid_request_error`, `rate_limit_error` or `server_error`")
    param: str | None = Field(..., description="the field at fault, as this API names it")
    code: str | None = Field(..., description="the service's error code (`invalid_input`, `queue_full`, ...)")


class OpenAIErrorResponse(BaseModel):
    """Every error of the OpenAI surface: OpenAI's shape, so the SDK raises its own error classes."""

    error: OpenAIErrorDetail


def to_image_request(options: ImageOptions, request_id: str | None, image: bytes | None = None,
                     mask: bytes | None = None) -> ImageRequest:
    """The engine's request for a validated body (with the edit's files, if any)."""
    size = parse_size(options.size) if options.size is not None else None
    if size is None and image is None:
        size = (DEFAULT_SIDE, DEFAULT_SIDE)  # `auto` for a new image; an edit's is the input's size
    steps = options.num_inference_steps or QUALITY_STEPS.get(options.quality or "auto")
    return ImageRequest(
        prompt=options.prompt, negative_prompt=options.negative_prompt, num_inference_steps=steps,
        guidance_scale=options.guidance_scale, width=size[0] if size else None, height=size[1] if size else None,
        seed=options.seed, num_images=options.n, output_format=options.output_format,
        output_quality=options.output_compression if options.output_format != "png" else None,
        image=image, strength=getattr(options, "strength", None), mask_image=mask, mask_alpha=mask is not None,
        request_id=request_id, user=options.user, loras=tuple(lora.choice() for lora in options.loras or ()))


def now() -> int:
    return int(time.time())
