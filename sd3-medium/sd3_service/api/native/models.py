"""The native API's wire models: `POST /predict` (and `/txt2img`, `/img2img`), its answers and errors.

The OpenAPI page, request validation and the README's tables all come from these models; each body
becomes the engine's `ImageRequest` in `to_image_request`.
"""

from __future__ import annotations

import binascii
import functools
import operator
import types
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from sd3_service.errors import ERROR_CODES
from sd3_service.spec import (DATA_URL, MAX_SIDE, MIN_SIDE, OCI_URI, REQUEST_ID, Answer, ImageRequest, LoraSpec,
                              OutputFormat, Pending, WireModel, base64_payload, decode_base64, declared)


def _image_form(text: str) -> str:
    """An image field is `oci://bucket@namespace/object`, a base64 `data:` URL, or raw base64 (checked here;
    whether the bytes are an image is checked when the request is prepared, see `inputs.py`)."""
    if text.startswith("oci://"):
        if not OCI_URI.match(text):
            raise ValueError("not an Object Storage URI: use oci://<bucket>@<namespace>/<object name>")
        return text
    if text.startswith("data:") and not DATA_URL.match(text):
        raise ValueError("a data: URL must be base64, as data:image/png;base64,<data>")
    payload = base64_payload(text)
    try:
        if not payload or len(decode_base64(payload)) == 0:
            raise ValueError
    except (binascii.Error, ValueError):
        raise ValueError("not base64: send the image file's bytes in base64 (raw or as a data: URL), "
                         "or an oci://<bucket>@<namespace>/<object name> URI") from None
    return text


ImageInput = Annotated[str, AfterValidator(_image_form)]
IMAGE_FORMS = ("base64 of a PNG, JPEG or WebP file (raw, or a `data:image/...;base64,` URL), or "
               "`oci://<bucket>@<namespace>/<object>` read with the service's own credentials from an allowed "
               f"bucket (`INPUT_BUCKETS`). {MIN_SIDE} to {MAX_SIDE} pixels a side.")

_SIZE_NOTE = " With `image` and no size given: the input's size, rounded down to a multiple of 16."


class ImageParameters(WireModel):
    """What to generate: one image's parameters (the body of `POST /txt2img`)."""

    # Strict: `true` is not a seed and `"28"` is not a step count; a JSON integer still fills a float field.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = declared("prompt")
    negative_prompt: str | None = declared("negative_prompt")
    num_inference_steps: int = declared("num_inference_steps")
    guidance_scale: float = declared("guidance_scale")
    width: int = declared("width", _SIZE_NOTE)
    height: int = declared("height", _SIZE_NOTE)
    seed: int | None = declared("seed", " Null: one made from the request id, so a retry makes the same image.")
    output_format: OutputFormat = declared("output_format")
    loras: list[LoraSpec] | None = declared("loras")


def _mask_needs_image(mask: str | None, info: ValidationInfo) -> str | None:
    if mask is not None and info.data.get("image") is None:
        raise ValueError("needs a valid `image` beside it: inpainting repaints the mask's white area "
                         "of that image")
    return mask


def _check_strength(strength: float, info: ValidationInfo) -> float:
    # Runs only for a strength the client sent: one without an image would be silently ignored.
    if info.data.get("image") is None:
        raise ValueError("applies only with `image` (how much of it to repaint)")
    return strength


def _events_need_webhook(events: list | None, info: ValidationInfo) -> list | None:
    if events is not None and info.data.get("webhook") is None:
        raise ValueError("applies only with `webhook` (where to send them)")
    return events


_MASK_NOTE = ("With `image`: repaint only the mask's white area (inpainting); the same forms as `image`, and the "
              "same size as it.")


class Img2ImgParameters(ImageParameters):
    """Repaint a starting image (the body of `POST /img2img`): `image` is required."""

    image: ImageInput = Field(..., description="The starting image: " + IMAGE_FORMS)
    strength: float = declared("strength", " Only with `image`.")
    mask_image: ImageInput | None = Field(None, description=_MASK_NOTE)
    webhook: str | None = declared("webhook")
    webhook_events_filter: list[Literal["start", "completed"]] | None = declared("webhook_events_filter")

    _mask_needs_image = field_validator("mask_image")(_mask_needs_image)
    _check_strength = field_validator("strength")(_check_strength)
    _events_need_webhook = field_validator("webhook_events_filter")(_events_need_webhook)


class PredictRequest(ImageParameters):
    """A request to `POST /predict`: text to image, or image to image with `image`, or inpainting with
    `image` and `mask_image`. Every field but `prompt` is optional."""

    num_images: int = declared("num_images")
    request_id: str | None = declared(
        "request_id", " Other parameters with it: 409. Null lets the server make one (128-bit random); clients "
                      "sharing a deployment should use unguessable ids too, since whoever knows an id can poll its "
                      "answer.")
    wait: bool = Field(True, description="False: answer 202 with the request's status as soon as it is accepted, "
                                         "then poll with `{\"request_id\": ...}`. True waits for the images, up to "
                                         "`SYNC_WAIT_SECONDS`, then answers the same 202.")
    image: ImageInput | None = Field(None, description="Start from this image (image to image): " + IMAGE_FORMS)
    strength: float = declared("strength", " Only with `image`.")
    mask_image: ImageInput | None = Field(None, description=_MASK_NOTE)
    webhook: str | None = declared("webhook")
    webhook_events_filter: list[Literal["start", "completed"]] | None = declared("webhook_events_filter")
    stream: bool = declared("stream", " Events: `queued` (position), `progress` (step of steps), `preview` (with "
                                      "`previews`), then `done` (the answer a non-streamed call gets) or `error` "
                                      "(its error body); a `: keep-alive` comment at least every 15 s.")
    previews: int = declared("previews")

    _mask_needs_image = field_validator("mask_image")(_mask_needs_image)
    _check_strength = field_validator("strength")(_check_strength)
    _events_need_webhook = field_validator("webhook_events_filter")(_events_need_webhook)


class PredictResponse(Answer):
    """The answer to a `POST /predict`."""


class PollRequest(WireModel):
    """Polling (the body of `POST /predict` with nothing but an id): the answer once done, else the status."""

    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: str = Field(..., pattern=REQUEST_ID, description="the id of a request sent before")


class Progress(BaseModel):
    step: int = Field(..., description="denoising steps done")
    steps: int = Field(..., description="denoising steps in all")


class PendingResponse(BaseModel):
    """The 202 answer: accepted, not done yet. Poll with `{"request_id": ...}` after `retry_after` seconds."""

    request_id: str = Field(..., description="the id to poll with")
    status: Literal["queued", "running"] = Field(..., description="waiting for a device, or generating")
    position: int | None = Field(..., description="1 for the next request a device takes; null once running, or "
                                                  "when the instance answering is not the one holding it")
    progress: Progress | None = Field(..., description="denoising steps done, on the instance running it; else null")
    retry_after: int = Field(..., description="seconds to wait before polling (also the `Retry-After` header)")

    @classmethod
    def of(cls, pending: Pending) -> PendingResponse:
        progress = None if pending.progress is None else Progress(step=pending.progress[0], steps=pending.progress[1])
        return cls(request_id=pending.request_id, status=pending.status, position=pending.position,
                   progress=progress, retry_after=pending.retry_after)


class Problem(BaseModel):
    """One invalid field of a request."""

    field: str = Field(..., description="the field, dotted for nested ones (`body` for the body as a whole)")
    message: str = Field(..., description="what is wrong with it and what is allowed")


class ErrorDetail(BaseModel):
    code: str = Field(..., description=", ".join(f"`{code}`" for code in ERROR_CODES))
    message: str = Field(..., description="what is wrong and what is allowed")
    field: str | None = Field(..., description="the (first) offending field; null when no field is at fault")
    problems: list[Problem] | None = Field(None, description="every invalid field, for `invalid_input`")


class ErrorResponse(BaseModel):
    """Every error the service answers (4xx and 5xx) has this body."""

    error: ErrorDetail


class HealthResponse(BaseModel):
    """The body of `GET /health`: 200 when ready, 503 while loading or after a failed load."""

    status: Literal["loading", "ready", "failed"] = Field(..., description="where start-up stands")
    model: str | None = Field(None, description="the model served, once ready")
    device: str | None = Field(None, description="where it runs, once ready")
    dtype: str | None = Field(None, description="its weights' dtype, once ready")
    devices: list[dict] | None = Field(None, description="each device: `device`, `state` (`loading`, `ready`, "
                                                      "`failed`) and, for a failed one, `error`")
    store: dict | None = Field(None, description="the image store: kind, where, state, images waiting in the spool")
    jobs: int | None = Field(None, description="requests this server holds, queued or running")
    error: str | None = Field(None, description="why loading failed")


def to_image_request(sent: ImageParameters) -> ImageRequest:
    """The engine's request for a validated body of `/predict`, `/txt2img` or `/img2img`.

    A size the client did not send is 1024, except with an input image, where it is left to the image's size.
    """
    given = sent.model_fields_set
    image = getattr(sent, "image", None)
    unsized = image is not None
    return ImageRequest(
        prompt=sent.prompt, negative_prompt=sent.negative_prompt, num_inference_steps=sent.num_inference_steps,
        guidance_scale=sent.guidance_scale,
        width=sent.width if "width" in given or not unsized else None,
        height=sent.height if "height" in given or not unsized else None,
        seed=sent.seed, num_images=getattr(sent, "num_images", 1), output_format=sent.output_format,
        image=image, strength=getattr(sent, "strength", None) if image is not None else None,
        mask_image=getattr(sent, "mask_image", None), request_id=getattr(sent, "request_id", None),
        wait=getattr(sent, "wait", True) or getattr(sent, "stream", False),  # a stream is a caller that waits
        previews=getattr(sent, "previews", 0) if getattr(sent, "stream", False) else 0,
        webhook=getattr(sent, "webhook", None),
        webhook_events=tuple(getattr(sent, "webhook_events_filter", None) or ("completed",)), loras=tuple(lora.choice() for lora in sent.loras or ()),
    )


def _without_checks(annotation):
    """`annotation` without the validators `Annotated` attaches (as `ImageInput` does), in unions too."""
    if get_origin(annotation) is Annotated:
        return get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return functools.reduce(operator.or_, (_without_checks(arg) for arg in get_args(annotation)))
    return annotation


def schema_only(name: str, *models: type[BaseModel], optional: frozenset[str] | None = None) -> type[BaseModel]:
    """A model with the fields, types and descriptions of `models` but none of their checks, for BentoML's route
    declarations.

    BentoML's client builds its calls from them (`bentoml.SyncHTTPClient(url).predict(prompt=...)`) and reads
    only the answer fields they name, while the guard (`api/guard.py`) validates each body with the model itself,
    once. `optional`: fields that lose `required` (None: all of them).
    """
    fields = {}
    for model in models:
        for field_name, info in model.model_fields.items():
            annotation, default = _without_checks(info.annotation) | None, info.default  # null: the default
            if optional is None or field_name in optional:
                default = None
            fields[field_name] = (annotation, Field(default, description=info.description))
    return create_model(name, __config__=ConfigDict(extra="allow"), __doc__=models[0].__doc__, **fields)
