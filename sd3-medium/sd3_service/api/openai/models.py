"""The OpenAI Images API's wire models, as the official `openai` SDK sends and reads them, and their mapping.

`POST /v1/images/generations` takes JSON (`GenerationBody`), `POST /v1/images/edits` and
`POST /v1/images/variations` a multipart form (`EditForm`, `VariationForm`: every value a string there); each
becomes the engine's `ImageRequest` in `to_image_request`. Every field of OpenAI's image requests (as the pinned
`openai` SDK defines them) is taken: used, mapped (`size`, `quality`), accepted and ignored (said in its
description), or refused with 400 where it asks for what this model cannot do.
This model's own knobs ride as extension fields (the SDK's `extra_body`). Field names in errors are the
API's (`n`, `size`, `mask`), see `WIRE_NAMES`.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sd3_service.spec import (DEFAULT_SIDE, MAX_SIDE, MIN_SIDE, SIDE_STEP, ImageRequest, LoraSpec, OutputFormat,
                              WireModel, declared)

SIZE = re.compile(r"^(?P<width>\d{1,5})x(?P<height>\d{1,5})$")
# DALL-E 3's wide and tall sizes, past this model's 1536: made at the nearest shape it draws (multiples of 16).
LARGER_SIZES = {"1792x1024": (1536, 880), "1024x1792": (880, 1536)}
# `quality` sets the denoising steps when `num_inference_steps` is not sent.
QUALITY_STEPS = {"low": 14, "medium": 28, "standard": 28, "auto": 28, "high": 40, "hd": 40, "xhigh": 45, "max": 50}
VARIATION_STRENGTH = 0.6  # a variation keeps the image's composition and colours and redraws its details
# The engine's names for the fields this API names otherwise (errors name the field as the caller sent it).
WIRE_NAMES = {"num_images": "n", "width": "size", "height": "size", "mask_image": "mask",
              "output_quality": "output_compression"}
IGNORED = "Accepted and ignored: "


def parse_size(size: str) -> tuple[int, int] | None:
    """`WxH` as (width, height) within this service's bounds, `auto` as None; `ValueError` saying what is allowed."""
    if size == "auto":
        return None
    if size in LARGER_SIZES:
        return LARGER_SIZES[size]
    match = SIZE.match(size)
    allowed = (f"`auto` or `WxH` with each side {MIN_SIDE} to {MAX_SIDE} and a multiple of {SIDE_STEP} "
               f"(such as 1024x1024, 1536x1024, 768x1344), or 1792x1024 / 1024x1792")
    if match is None:
        raise ValueError(f"'{size}' is not a size: use {allowed}")
    width, height = int(match["width"]), int(match["height"])
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_STEP:
            raise ValueError(f"{width}x{height} is outside what this model makes: use {allowed}")
    return width, height


class ImageOptions(WireModel):
    """What every images route takes (variations too): OpenAI's fields, and this model's own as extensions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="One of the names `GET /v1/models` lists (`SERVED_MODEL_NAMES`), "
                                                "or absent.")
    n: int = declared("num_images")
    size: str | None = Field(None, pattern=r"^(auto|\d{1,5}x\d{1,5})$",
                             description="`WxH`, each side 256 to 1536 and a multiple of 16, or `auto` (1024x1024 "
                                         "for a new image, the input's size for an edit). DALL-E 3's 1792x1024 "
                                         "and 1024x1792 are made at 1536x880 and 880x1536; `size` in the answer "
                                         "says which.")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="`b64_json` (the image in the answer), or `url`: a time-limited read-only link, "
                                "where the deployment makes them (`RETURN_URL` with a bucket).")
    user: str | None = declared("user")
    output_format: OutputFormat = declared("output_format", " `gif` and `svg` are not made here.")
    output_compression: int | None = declared("output_quality")
    # Extensions (the SDK's `extra_body`)
    negative_prompt: str | None = declared("negative_prompt")
    num_inference_steps: int | None = declared("num_inference_steps", default=None,
                                               description="Denoising steps (28 unless `quality` says otherwise).")
    guidance_scale: float = declared("guidance_scale")
    seed: int | None = declared("seed")
    loras: list[LoraSpec] | None = declared("loras")

    @field_validator("size")
    @classmethod
    def _size(cls, size: str | None) -> str | None:
        if size is not None:
            parse_size(size)
        return size

    @field_validator("output_format", mode="before")
    @classmethod
    def _writable(cls, output_format):
        if output_format in ("gif", "svg"):
            raise ValueError(f"'{output_format}' is not a format this service writes: use png, jpeg or webp")
        return output_format


class PromptedOptions(ImageOptions):
    """What the routes that take a prompt take (generations and edits)."""

    prompt: str = declared("prompt")
    quality: Literal["auto", "low", "medium", "high", "standard", "hd", "xhigh", "max"] | None = Field(
        None, description="Sets the denoising steps when `num_inference_steps` is not sent: low 14; auto, "
                          "standard and medium 28; high and hd 40; xhigh 45; max 50.")
    background: Literal["auto", "opaque"] | None = Field(
        None, description="`auto` or `opaque`; this model makes no transparent images.")
    frame_count: int | None = Field(None, ge=1, json_schema_extra={"maximum": 1}, description="1 (or absent): this model makes still images; more "
                                                            "is refused.")
    safety_identifier: str | None = Field(None, max_length=256, description="Your end user's id, as `user` (and "
                                                                            "in its place when both are sent).")
    stream: bool = declared("stream", " Events as the SDK's `stream=True` reads them: `partial_images` partial "
                                      "images, then one completed event per image.")
    partial_images: int | None = declared("previews", default=None,
                                          description="With `stream`: how many estimates of the image to send while "
                                                      "it is drawn, 0 to 3, at evenly spaced steps (fewer with few "
                                                      "steps); with `n` > 1, of the first image.")
    moderation: Literal["low", "auto"] | None = Field(None, description=IGNORED + "this deployment runs no "
                                                                                  "moderation model.")
    complexity: Literal["low", "medium", "high"] | None = Field(None, description=IGNORED + "the steps follow "
                                                                                            "`quality`.")
    frame_duration_ms: int | None = Field(None, ge=0, description=IGNORED + "there is one frame.")
    svg: dict | str | None = Field(None, description=IGNORED + "options of SVG output, which is not made here.")

    @field_validator("background", mode="before")
    @classmethod
    def _opaque(cls, background):
        if background == "transparent":
            raise ValueError("'transparent' is not available: Stable Diffusion 3 makes opaque images; use `auto` "
                             "or `opaque`")
        return background

    @field_validator("frame_count")
    @classmethod
    def _one_frame(cls, frames: int | None) -> int | None:
        if frames is not None and frames > 1:
            raise ValueError(f"{frames} frames: this model makes still images; send 1 or leave it out (`n` asks "
                             "for several images)")
        return frames


class GenerationBody(PromptedOptions):
    """The JSON body of `POST /v1/images/generations`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    style: Literal["vivid", "natural"] | None = Field(None, description=IGNORED + "DALL-E 3's rendering styles; "
                                                                                  "the prompt sets the style here.")


class FormLora(LoraSpec):
    """An adapter as a form sends it (`loras[][name]`, `loras[][scale]`): its scale is text."""

    model_config = ConfigDict(extra="forbid", strict=False)


class EditForm(PromptedOptions):
    """The form fields of `POST /v1/images/edits` besides its files (`image`, `mask`): strings, read as numbers
    where the field is one."""

    model_config = ConfigDict(extra="forbid", strict=False)

    loras: list[FormLora] | None = declared("loras")
    strength: float | None = declared("strength", default=None,
                                      description="How much of `image` to repaint, 0 < strength <= 1 (0.8 when "
                                                  "absent).")
    input_fidelity: Literal["high", "low"] | None = Field(None, description=IGNORED + "the image's own pixels "
                                                                                      "guide the edit; `strength` "
                                                                                      "sets how much changes.")


class VariationForm(ImageOptions):
    """The form fields of `POST /v1/images/variations` besides its `image`: image to image with no prompt."""

    model_config = ConfigDict(extra="forbid", strict=False)

    loras: list[FormLora] | None = declared("loras")
    strength: float = declared("strength", default=VARIATION_STRENGTH,
                               description=f"How much of `image` to redraw, 0 < strength <= 1 ({VARIATION_STRENGTH} "
                                           "keeps its composition and colours and redraws the details).")


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
    """The engine's request for a validated body (with the edit's or variation's files, if any)."""
    size = parse_size(options.size) if options.size is not None else None
    if size is None and image is None:
        size = (DEFAULT_SIDE, DEFAULT_SIDE)  # `auto` for a new image; an edit's is the input's size
    quality = getattr(options, "quality", None)
    steps = options.num_inference_steps or QUALITY_STEPS.get(quality or "auto")
    output_format = getattr(options, "output_format", "png")
    compression = getattr(options, "output_compression", None)
    streamed = getattr(options, "stream", False)
    return ImageRequest(
        prompt=getattr(options, "prompt", ""), negative_prompt=options.negative_prompt, num_inference_steps=steps,
        guidance_scale=options.guidance_scale, width=size[0] if size else None, height=size[1] if size else None,
        seed=options.seed, num_images=options.n, output_format=output_format,
        output_quality=compression if output_format != "png" else None,
        image=image, strength=getattr(options, "strength", None), mask_image=mask, mask_alpha=mask is not None,
        request_id=request_id, user=getattr(options, "safety_identifier", None) or options.user,
        previews=(getattr(options, "partial_images", None) or 0) if streamed else 0,
        loras=tuple(lora.choice() for lora in options.loras or ()))


def now() -> int:
    return int(time.time())
