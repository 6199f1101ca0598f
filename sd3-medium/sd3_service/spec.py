"""What a request asks the engine for, and what it gets back, whichever API surface it came through.

Every API surface validates its own wire format and hands the engine an `ImageRequest`; the engine
answers an `Answer` (done: where each image is) or a `Pending` (accepted, not done yet). The bounds
here are the model's and the platform's, shared by every surface's validation.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

MAX_SEED = 2**32 - 1
MIN_SIDE, MAX_SIDE = 256, 1536  # pixels, for generated images and for input images alike
SIDE_STEP = 16  # generated sides are multiples of this
DEFAULT_SIDE = 1024
MAX_STEPS = 50
MAX_IMAGES = 4
MAX_PROMPT_CHARS = 2000
MAX_GUIDANCE = 20.0
MAX_LORAS = 4  # adapters one request may apply
MAX_LORA_SCALE = 2.0
MAX_PREVIEWS = 3  # estimates a streamed request may show while it is drawn
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
OutputFormat = Literal["png", "jpeg", "webp"]
Mode = Literal["txt2img", "img2img", "inpaint"]
DEFAULT_QUALITY = 95  # JPEG and WebP, when the request does not say
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 7.0
DEFAULT_STRENGTH = 0.8
REQUEST_ID = r"^[A-Za-z0-9_-]{1,64}$"

# The text forms of an input image: an Object Storage URI, a base64 `data:` URL, or raw base64.
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


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA adapter a request asks for: its name (catalog stem or `oci://` URI) and how strongly to apply it."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class ResolvedLora:
    """An adapter a request asked for, as a file on this machine, identified by its content."""

    name: str  # as the request named it
    sha256: str
    scale: float
    path: str

    def describe(self) -> dict:
        """What records and metadata keep of it."""
        return {"name": self.name, "sha256": self.sha256, "scale": self.scale}


@dataclass(frozen=True)
class ImageRequest:
    """What to make, as every API surface hands it to the engine (already validated by that surface).

    `image` and `mask_image` are the files' bytes, or text in one of the forms above. `width`/`height`
    None: the input image's size rounded down to a multiple of 16, or 1024 without one. `mask_alpha`: the
    mask's fully transparent pixels mark the area to repaint (OpenAI's convention) instead of its white ones.
    """

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    width: int | None = DEFAULT_SIDE
    height: int | None = DEFAULT_SIDE
    seed: int | None = None
    num_images: int = 1
    output_format: OutputFormat = "png"
    output_quality: int | None = None
    image: str | bytes | None = None
    strength: float | None = None
    mask_image: str | bytes | None = None
    mask_alpha: bool = False
    loras: tuple[LoraChoice, ...] = ()
    request_id: str | None = None
    wait: bool = True
    previews: int = 0  # estimates of the images to show while they are drawn (a stream's); not recorded
    webhook: str | None = None  # where to send its events (see webhooks.py)
    webhook_events: tuple[str, ...] = ("completed",)
    user: str | None = field(default=None, repr=False)  # the caller's end user: kept only as a digest

    @property
    def mode(self) -> Mode:
        """`txt2img`, `img2img` or `inpaint`: which pipeline serves the request."""
        if self.image is None:
            return "txt2img"
        return "img2img" if self.mask_image is None else "inpaint"

    @property
    def repaint_strength(self) -> float | None:
        """How much of the input image to repaint (None without one)."""
        if self.image is None:
            return None
        return DEFAULT_STRENGTH if self.strength is None else self.strength

    def sized(self, width: int, height: int) -> ImageRequest:
        return replace(self, width=width, height=height)

    def parameters(self, seed: int | None = None) -> dict:
        """What to make, as records and sidecars keep it (input images as sent; `seed`: the one used, when known).
        Fields at their default are left out, so that a record stays comparable when a field is added."""
        parameters = {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                      "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                      "width": self.width, "height": self.height, "seed": self.seed if seed is None else seed,
                      "output_format": self.output_format, "num_images": self.num_images}
        optional = {"image": self.image, "mask_image": self.mask_image, "strength": self.repaint_strength,
                    "output_quality": self.output_quality, "mask_alpha": self.mask_alpha or None,
                    "loras": [{"name": lora.name, "scale": lora.scale} for lora in self.loras] or None,
                    "webhook": self.webhook,
                    "webhook_events_filter": sorted(self.webhook_events) if self.webhook else None}
        return parameters | {name: value for name, value in optional.items() if value is not None}


def _visible(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must contain visible text")
    return prompt


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_visible)]
"""A prompt as every API surface takes it: 1 to `MAX_PROMPT_CHARS` characters, not only blanks."""


class WireModel(BaseModel):
    """A request body as a surface takes it: `null` for a field means its default, as if it were not sent."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, sent):
        if isinstance(sent, dict):
            return {name: value for name, value in sent.items() if value is not None}
        return sent


class LoraSpec(WireModel):
    """One LoRA adapter to apply, as every API surface takes it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., min_length=1, max_length=1100,
                      description="An adapter of this deployment's catalog (`GET /health` lists it), or "
                                  "`oci://<bucket>@<namespace>/<object>` in one of the buckets `LORA_BUCKETS` allows.")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE,
                         description="How strongly to apply it, -2 to 2; 0 applies nothing.")

    def choice(self) -> LoraChoice:
        return LoraChoice(self.name, self.scale)


LORAS_DESCRIPTION = (f"LoRA adapters to apply, up to {MAX_LORAS}: each `{{\"name\": ..., \"scale\": ...}}`. "
                     "Identified by content (sha256) in the image's metadata and the request's record.")


class RequestFields(BaseModel):
    """Every request parameter, declared once: its type, bounds, default and meaning, under the engine's name.

    Each surface's wire model takes its fields from here with `declared` (under its own name where its API names
    the field otherwise, and with a note of its own where it adds one); tests/test_request_fields.py checks that
    every surface field declared here keeps the declared type, and the docs' tables are made from the models.
    """

    prompt: Prompt = Field(..., description="What to draw.")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="What to keep out of the "
                                                                                         "image.")
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=1, le=MAX_STEPS, description="Denoising steps; more is "
                                                                                    "slower and finer.")
    guidance_scale: float = Field(DEFAULT_GUIDANCE, ge=0, le=MAX_GUIDANCE, description="How strongly to follow the "
                                                                                       "prompt (CFG).")
    width: int = Field(DEFAULT_SIDE, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP,
                       description="Image width in pixels, a multiple of 16.")
    height: int = Field(DEFAULT_SIDE, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP,
                        description="Image height in pixels, a multiple of 16.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; the same seed and parameters give "
                                                                  "the same image.")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="How many images to make.")
    output_format: OutputFormat = Field("png", description="Image file format.")
    output_quality: int | None = Field(None, ge=0, le=100, description=f"JPEG and WebP quality, 0 to 100 "
                                                                       f"({DEFAULT_QUALITY} when absent); PNG is "
                                                                       "lossless.")
    strength: float = Field(DEFAULT_STRENGTH, gt=0, le=1,
                            description="How much of the input image to repaint, 0 < strength <= 1 (1 ignores it): "
                                        "the last strength x num_inference_steps steps run, at least one.")
    loras: list[LoraSpec] | None = Field(None, max_length=MAX_LORAS, description=LORAS_DESCRIPTION)
    request_id: str | None = Field(None, pattern=REQUEST_ID, description="Idempotency key: the same id sent again, "
                                                                         "to any instance, answers the first answer.")
    user: str | None = Field(None, max_length=256, description="Your end user's id; kept only as its sha256.")
    webhook: str | None = Field(None, max_length=2048, description="An absolute https:// URL to send the request's "
                                                                   "events to, signed (Standard Webhooks): its host "
                                                                   "must be one of the deployment's WEBHOOK_HOSTS.")
    webhook_events_filter: list[Literal["start", "completed"]] | None = Field(
        None, min_length=1, description="Which events to send: `start` (its generation began) and `completed` (done, "
                                        "or failed); `[\"completed\"]` when absent.")
    stream: bool = Field(False, description="True: answer `text/event-stream`, events while the images are drawn, "
                                            "then the images.")
    previews: int = Field(0, ge=0, le=MAX_PREVIEWS, description=f"With `stream`: how many estimates of the images "
                                                                f"to send while they are drawn, 0 to {MAX_PREVIEWS}, "
                                                                "at evenly spaced steps (fewer with few steps); "
                                                                "without `stream`, nothing.")


def declared(name: str, note: str = "", **changes: Any) -> FieldInfo:
    """The declaration of request field `name` (a copy, for a surface's model), its description followed by `note`,
    and `changes` (another `default`, `description` or `alias`) applied."""
    field_info = RequestFields.model_fields[name]
    description = changes.pop("description", field_info.description) + note
    return FieldInfo.merge_field_infos(field_info, description=description, **changes)


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


class Answer(BaseModel):
    """A finished request: its id, the seed used, where each image is, and where the time went."""

    request_id: str = Field(..., description="the client's `request_id`, or one the server made")
    seed: int = Field(..., description="the seed used: send it back to get the same images")
    images: list[StoredImage] = Field(..., description="one entry per image, in order")
    timings_ms: dict[str, int] = Field(..., description="queue, generate, encode, store in milliseconds")

    def without_data(self) -> Answer:
        """The answer without inline image data: what is held in memory for repeats (an image not stored yet is
        read back from the spool on disk when a repeat asks)."""
        if all(image.data is None for image in self.images):
            return self
        return self.model_copy(update={"images": [image.model_copy(update={"data": None}) for image in self.images]})


@dataclass(frozen=True)
class InputImage:
    """A decoded input image: `pixels` (a PIL image) at the output size; the rest describes the input as sent."""

    pixels: Any
    sha256: str
    bytes: int
    width: int
    height: int
    format: str
    uri: str | None  # the oci:// URI it was read from; None when sent in the request

    def describe(self) -> dict:
        """What the records keep of it (never the bytes)."""
        about = {"sha256": self.sha256, "bytes": self.bytes, "width": self.width, "height": self.height,
                 "format": self.format}
        return about | ({"uri": self.uri} if self.uri else {})


@dataclass(frozen=True)
class Inputs:
    """What a request starts from: nothing (text to image), an image, or an image and a (black and white) mask."""

    image: InputImage | None = None
    mask: InputImage | None = None
    strength: float | None = None

    def describe(self) -> dict:
        return {name: value.describe() for name, value in (("image", self.image), ("mask_image", self.mask))
                if value is not None}


NO_INPUTS = Inputs()


@dataclass(frozen=True)
class Pending:
    """A request accepted and not done yet: where it stands, and when to ask again."""

    request_id: str
    status: Literal["queued", "running"]
    position: int | None  # 1 for the next request a device takes; None once running or when not held here
    progress: tuple[int, int] | None  # (step, steps) on the instance running it
    retry_after: int  # seconds


@dataclass(frozen=True)
class Queued:
    """A streamed request waits for a device: `position` 1 is next (None when another instance holds it)."""

    request_id: str
    position: int | None


@dataclass(frozen=True)
class Stepped:
    """A streamed request's denoising step `step` of `steps` is done."""

    request_id: str
    step: int
    steps: int


@dataclass(frozen=True)
class Previewed:
    """The `index`th estimate of a streamed request's images after `step` of `steps`: encoded files, one per image."""

    request_id: str
    index: int
    step: int
    steps: int
    files: list  # list[EncodedImage]


@dataclass(frozen=True)
class KeepAlive:
    """Nothing new for a while: a streamed answer says it is still there."""


@dataclass(frozen=True)
class Finished:
    """What the engine gives a caller once a request is done: the answer, and the encoded bytes when this call
    made them (a repeat has none; `files` then come from the store, see `Engine.image_bytes`)."""

    answer: Answer
    files: list = field(default_factory=list)  # list[EncodedImage]
