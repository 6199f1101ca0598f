"""Starting images for image to image and inpainting: read, decoded, checked and sized before a device is touched.

An `image` or `mask_image` field holds base64 (raw or a `data:` URL) or an `oci://bucket@namespace/object`
URI; `contract.py` checks the form, this module the content. Every refusal is an `InputError` that names
the field: 400 for what the client can fix, 404 for an object that is not there, 503 while Object Storage
cannot be reached. Only the image's sha256, size and format are kept for the record, never its bytes.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, replace
from typing import Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from sd3_service.contract import MAX_SIDE, MIN_SIDE, OCI_URI, PredictRequest, base64_payload, decode_base64
from sd3_service.store import ObjectRefused, StoreError

# Pillow warns above this many pixels and refuses at twice as many; inputs are refused at any warning, so no
# image larger than the biggest one the contract allows is ever decoded (a small file can unpack to gigabytes).
Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
FORMATS = ("PNG", "JPEG", "WEBP")
MAX_OBJECT_BYTES = 32 * 1024 * 1024  # an oci:// input; a 1536x1536 RGBA PNG stored uncompressed is ~9.5 MB
SIDE = 16  # generated sides are multiples of this


class InputError(Exception):
    """A starting image the service cannot use, and the HTTP answer that says why."""

    def __init__(self, status: int, code: str, field: str, message: str, retry_after: int | None = None):
        super().__init__(f"{field}: {message}")
        self.status = status
        self.code = code
        self.field = field
        self.retry_after = retry_after


@dataclass(frozen=True)
class InputImage:
    """A decoded input: `pixels` at the output size; the rest describes the input as sent."""

    pixels: Image.Image
    sha256: str
    bytes: int
    width: int
    height: int
    format: str
    uri: str | None  # the oci:// URI it was read from; None for base64

    def describe(self) -> dict:
        """What the record keeps of it (never the bytes)."""
        about = {"sha256": self.sha256, "bytes": self.bytes, "width": self.width, "height": self.height,
                 "format": self.format}
        return about | ({"uri": self.uri} if self.uri else {})


@dataclass(frozen=True)
class Inputs:
    """What a request starts from: nothing (text to image), an image, or an image and a mask."""

    image: InputImage | None = None
    mask: InputImage | None = None
    strength: float | None = None

    def describe(self) -> dict:
        return {name: value.describe() for name, value in (("image", self.image), ("mask_image", self.mask))
                if value is not None}


NO_INPUTS = Inputs()


class ObjectReader(Protocol):
    def read(self, namespace: str, bucket: str, name: str, max_bytes: int) -> bytes:
        """The object's bytes; `ObjectRefused` when it cannot be read, `StoreError` when the store is down."""


class InputReader:
    """Turns a request's `image` and `mask_image` into checked pixels at the output size.

    Args:
        allowed_buckets: the buckets `oci://` inputs may come from (`INPUT_BUCKETS`).
        objects: reads them, with the service's own credentials; None when no bucket is allowed.
    """

    def __init__(self, allowed_buckets: frozenset[str] = frozenset(), objects: ObjectReader | None = None):
        self.allowed_buckets = allowed_buckets
        self.objects = objects

    def prepare(self, request: PredictRequest) -> tuple[PredictRequest, Inputs]:
        """The request with its output size settled, and its inputs; raises `InputError`. Slow: run off the loop."""
        if request.image is None:
            return request, NO_INPUTS
        image = self._decode("image", request.image)
        mask = None if request.mask_image is None else self._decode("mask_image", request.mask_image)
        if mask is not None and (mask.width, mask.height) != (image.width, image.height):
            raise InputError(400, "invalid_input", "mask_image",
                             f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}: "
                             "a mask must be its image's size")
        given = request.model_fields_set
        size = {"width": request.width if "width" in given else image.width // SIDE * SIDE,
                "height": request.height if "height" in given else image.height // SIDE * SIDE}
        target = (size["width"], size["height"])
        image = _resized(image, target, Image.Resampling.LANCZOS)
        if mask is not None:
            mask = _resized(mask, target, Image.Resampling.NEAREST)
            # Black and white, cut at half grey as the pipeline reads a mask: the same area is repainted by the
            # pipeline and pasted back around by `generation.keep_outside_mask`.
            mask = replace(mask, pixels=mask.pixels.point(lambda value: 255 if value >= 128 else 0))
        return request.model_copy(update=size), Inputs(image=image, mask=mask, strength=request.strength)

    # -- internals

    def _decode(self, field: str, text: str) -> InputImage:
        data, uri = self._read(field, text) if text.startswith("oci://") else (decode_base64(
            base64_payload(text)), None)
        kind = "image"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                opened = Image.open(io.BytesIO(data), formats=FORMATS)
                kind = f"{opened.format} image"
                _check_sides(field, *opened.size)  # from the header, before any pixel is decoded
                upright = ImageOps.exif_transpose(opened)  # a phone's JPEG is stored sideways; this loads it
                pixels = upright.convert("L" if field == "mask_image" else "RGB")
        except InputError:
            raise
        except UnidentifiedImageError:
            raise InputError(400, "invalid_input", field, f"not an image this service reads: send a "
                             f"{', '.join(FORMATS[:-1])} or {FORMATS[-1]} file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(400, "invalid_input", field, f"the image has over {Image.MAX_IMAGE_PIXELS} pixels; "
                             f"the most is {MAX_SIDE}x{MAX_SIDE}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(400, "invalid_input", field, f"the {kind} cannot be decoded "
                             f"(damaged or cut short): {exc}") from None
        return InputImage(pixels=pixels, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                          width=pixels.width, height=pixels.height, format=opened.format, uri=uri)

    def _read(self, field: str, uri: str) -> tuple[bytes, str]:
        match = OCI_URI.match(uri)
        assert match is not None  # the contract checked the form
        bucket, namespace, name = match["bucket"], match["namespace"], match["name"]
        if bucket not in self.allowed_buckets or self.objects is None:
            allowed = ", ".join(sorted(self.allowed_buckets)) or "none (set INPUT_BUCKETS or BUCKET_NAME)"
            raise InputError(400, "invalid_input", field,
                             f"bucket '{bucket}' is not one this service reads inputs from; allowed: {allowed}")
        try:
            return self.objects.read(namespace, bucket, name, MAX_OBJECT_BYTES), uri
        except ObjectRefused as exc:
            if exc.status == 404:
                raise InputError(404, "input_not_found", field, str(exc)) from None
            raise InputError(400, "invalid_input", field, f"cannot read {uri}: {exc}") from None
        except StoreError as exc:
            raise InputError(503, "input_unavailable", field, f"cannot read {uri} now: {exc}", retry_after=10) from None


def _check_sides(field: str, width: int, height: int) -> None:
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InputError(400, "invalid_input", field, f"the image is {width}x{height}; each side must be "
                         f"{MIN_SIDE} to {MAX_SIDE} pixels")


def _resized(image: InputImage, size: tuple[int, int], resample: Image.Resampling) -> InputImage:
    if image.pixels.size == size:
        return image
    return InputImage(pixels=image.pixels.resize(size, resample), sha256=image.sha256, bytes=image.bytes,
                      width=image.width, height=image.height, format=image.format, uri=image.uri)
