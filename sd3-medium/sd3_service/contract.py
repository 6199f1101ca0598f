"""The HTTP contract of the service: request and response models, in one place (docs/architecture.md).

The OpenAPI page, request validation and the README's tables all come from these models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**32 - 1
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageParameters(BaseModel):
    """What to generate: one image's parameters (the body of `POST /txt2img`)."""

    # Strict: `true` is not a seed and `"28"` is not a step count; a JSON integer still fills a float field.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(..., min_length=1, max_length=2000, description="What to draw.")
    negative_prompt: str | None = Field(None, max_length=2000, description="What to keep out of the image.")
    num_inference_steps: int = Field(28, ge=1, le=50, description="Denoising steps; more is slower and finer.")
    guidance_scale: float = Field(7.0, ge=0, le=20, description="How strongly to follow the prompt (CFG).")
    width: int = Field(1024, ge=256, le=1536, multiple_of=16, description="Image width in pixels, a multiple of 16.")
    height: int = Field(1024, ge=256, le=1536, multiple_of=16, description="Image height in pixels, a multiple of 16.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; the same seed and parameters give the same image. Null picks one.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must contain visible text")
        return prompt


class PredictRequest(ImageParameters):
    """A text-to-image request (the body of `POST /predict`); every field but `prompt` is optional."""

    num_images: int = Field(1, ge=1, le=4, description="How many images to generate from the prompt.")
    request_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Idempotency key: the same id sent again returns the first answer. Null lets the server make one.",
    )


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


class Problem(BaseModel):
    """One invalid field of a request."""

    field: str = Field(..., description="the field, dotted for nested ones (`body` for the body as a whole)")
    message: str = Field(..., description="what is wrong with it and what is allowed")


class ErrorDetail(BaseModel):
    code: str = Field(..., description="`invalid_input`, `malformed_json`, `payload_too_large`, `queue_full`, "
                                       "`not_ready`, `internal_error`")
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
    error: str | None = Field(None, description="why loading failed")

