"""The HTTP contract of the service: request and response models, in one place (docs/architecture.md).

The OpenAPI page, request validation and the README's tables all come from these models.
"""

from __future__ import annotations

import binascii
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_SEED = 2**32 - 1
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
REQUEST_ID = r"^[A-Za-z0-9_-]{1,64}$"
MIN_SIDE, MAX_SIDE = 256, 1536  # pixels, for generated images and for input images alike
OCI_URI = re.compile(r"^oci://(?P<bucket>[A-Za-z0-9._-]{1,256})@(?P<namespace>[A-Za-z0-9_-]{1,128})/(?P<name>[^\x00]{1,1024})$")
DATA_URL = re.compile(r"^data:(?P<media>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[\w.-]+)*;base64,", re.ASCII)


def base64_payload(text: str) -> str:
    """The base64 part of an image field (a `data:` URL's tail, or the text itself), without whitespace."""
    match = DATA_URL.match(text)
    # split/join: ~15 ms for 10 MB, where a whitespace regex took ~200 ms, on the event loop
    return "".join((text[match.end():] if match else text).split())


def decode_base64(payload: str) -> bytes:
    """The bytes of a payload from `base64_payload`; `binascii.Error` if it is not base64 (strictly: no stray
    characters, right padding)."""
    return binascii.a2b_base64(payload, strict_mode=True)


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


class ImageParameters(BaseModel):
    """What to generate: one image's parameters (the body of `POST /txt2img`)."""

    # Strict: `true` is not a seed and `"28"` is not a step count; a JSON integer still fills a float field.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(..., min_length=1, max_length=2000, description="What to draw.")
    negative_prompt: str | None = Field(None, max_length=2000, description="What to keep out of the image.")
    num_inference_steps: int = Field(28, ge=1, le=50, description="Denoising steps; more is slower and finer.")
    guidance_scale: float = Field(7.0, ge=0, le=20, description="How strongly to follow the prompt (CFG).")
    width: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16,
                       description="Image width in pixels, a multiple of 16." + _SIZE_NOTE)
    height: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16,
                        description="Image height in pixels, a multiple of 16." + _SIZE_NOTE)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; the same seed and parameters give "
                             "the same image. Null: one made from the request id, so a retry makes the same image.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must contain visible text")
        return prompt


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


_STRENGTH = Field(0.8, gt=0, le=1, description="How much of `image` to repaint, 0 < strength <= 1 (1 ignores it): "
                                                "the last strength x num_inference_steps steps run, at least one. "
                                                "Only with `image`.")
_MASK = Field(None, description="With `image`: repaint only the mask's white area (inpainting); the same forms as "
                                "`image`, and the same size as it.")


class Img2ImgParameters(ImageParameters):
    """Repaint a starting image (the body of `POST /img2img`): `image` is required."""

    image: ImageInput = Field(..., description="The starting image: " + IMAGE_FORMS)
    strength: float = _STRENGTH
    mask_image: ImageInput | None = _MASK

    _mask_needs_image = field_validator("mask_image")(_mask_needs_image)
    _check_strength = field_validator("strength")(_check_strength)


class PredictRequest(ImageParameters):
    """A request to `POST /predict`: text to image, or image to image with `image`, or inpainting with
    `image` and `mask_image`. Every field but `prompt` is optional."""

    num_images: int = Field(1, ge=1, le=4, description="How many images to generate from the prompt.")
    request_id: str | None = Field(
        None, pattern=REQUEST_ID,
        description="Idempotency key: the same id sent again, to any instance, returns the first answer (other "
                    "parameters with it: 409). Null lets the server make one (128-bit random); clients sharing a "
                    "deployment should use unguessable ids too, since whoever knows an id can poll its answer.",
    )
    wait: bool = Field(True, description="False: answer 202 with the request's status as soon as it is accepted, "
                                         "then poll with `{\"request_id\": ...}`. True waits for the images, up to "
                                         "`SYNC_WAIT_SECONDS`, then answers the same 202.")
    image: ImageInput | None = Field(None, description="Start from this image (image to image): " + IMAGE_FORMS)
    strength: float = _STRENGTH
    mask_image: ImageInput | None = _MASK

    _mask_needs_image = field_validator("mask_image")(_mask_needs_image)
    _check_strength = field_validator("strength")(_check_strength)

    @property
    def mode(self) -> str:
        """`txt2img`, `img2img` or `inpaint`: which pipeline serves the request."""
        if self.image is None:
            return "txt2img"
        return "img2img" if self.mask_image is None else "inpaint"


class StoredImage(BaseModel):
    """One generated image and where it is kept."""

    uri: str = Field(..., description="oci://bucket@namespace/object or file:// URI of the image")
    object_name: str = Field(..., description="`<OBJECT_PREFIX><yyyy>/<mm>/<dd>/<request_id>-<index>.<ext>`")
    bucket: str | None = Field(None, description="Object Storage bucket; null with the local store")
    namespace: str | None = Field(None, description="Object Storage namespace; null with the local store")
    content_type: str = Field(..., description="`image/png`, `image/jpeg` or `image/webp`")
    bytes: int = Field(..., description="size of the image file")
    sha256: str = Field(..., description="SHA-256 of the image file, hex")
    width: int = Field(..., description="pixels")
    height: int = Field(..., description="pixels")
    stored: bool = Field(..., description="False when storage failed: the image is in `data` and is stored later")
    data: str | None = Field(None, exclude_if=lambda v: v is None,
                             description="base64 image bytes, only when `stored` is false")
    url: str | None = Field(None, exclude_if=lambda v: v is None,
                            description="time-limited read-only link, when the server is configured for links")


class PredictResponse(BaseModel):
    """The answer to a `POST /predict`."""

    request_id: str = Field(..., description="the client's `request_id`, or one the server made")
    seed: int = Field(..., description="the seed used: send it back to get the same images")
    images: list[StoredImage] = Field(..., description="one entry per image, in order")
    timings_ms: dict[str, int] = Field(..., description="queue, generate, encode, store in milliseconds")


class PollRequest(BaseModel):
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


class Problem(BaseModel):
    """One invalid field of a request."""

    field: str = Field(..., description="the field, dotted for nested ones (`body` for the body as a whole)")
    message: str = Field(..., description="what is wrong with it and what is allowed")


class ErrorDetail(BaseModel):
    code: str = Field(..., description="`invalid_input`, `malformed_json`, `payload_too_large`, `queue_full`, "
                                       "`not_ready`, `input_not_found`, `input_unavailable`, `unknown_request`, "
                                       "`request_id_reused`, `request_interrupted`, `ledger_unavailable`, "
                                       "`internal_error`")
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

