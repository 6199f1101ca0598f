"""Starting images for image to image and inpainting: read, decoded, checked and sized before a device is touched.

An `image` or `mask_image` is the file's bytes, base64 text (raw or a `data:` URL) or an
`oci://bucket@namespace/object` URI; each API surface checks the form, this module the content. Every
refusal is a `ServiceError` that names the field: 400 for what the client can fix, 404 for an object that
is not there, 503 while Object Storage cannot be reached. Only the image's sha256, size and format are kept
for the records, never its bytes.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import replace
from typing import Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from sd3_service.errors import ServiceError, invalid_field
from sd3_service.spec import (DEFAULT_SIDE, MAX_SIDE, MIN_SIDE, NO_INPUTS, OCI_URI, SIDE_STEP, ImageRequest, InputImage,
                              Inputs, base64_payload, decode_base64)
from sd3_service.storage.store import ObjectRefused, StoreError

# Pillow warns above this many pixels and refuses at twice as many; inputs are refused at any warning, so no
# image larger than the biggest one the contract allows is ever decoded (a small file can unpack to gigabytes).
Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
FORMATS = ("PNG", "JPEG", "WEBP")
MAX_OBJECT_BYTES = 32 * 1024 * 1024  # an oci:// input; a 1536x1536 RGBA PNG stored uncompressed is ~9.5 MB


def allowed_object(field: str, uri: str, allowed_buckets: frozenset[str] | set[str], what: str,
                   setting: str) -> tuple[str, str, str]:
    """`oci://bucket@namespace/object` as (bucket, namespace, object name), when the bucket is one this service
    reads `what` from; else a 400 on `field` that names the allowed buckets and the `setting` that lists them."""
    match = OCI_URI.match(uri)
    if match is None:
        raise invalid_field(field, "not an Object Storage URI: use oci://<bucket>@<namespace>/<object name>")
    bucket = match["bucket"]
    if bucket not in allowed_buckets:
        allowed = ", ".join(sorted(allowed_buckets)) or f"none (set {setting})"
        raise invalid_field(field, f"bucket '{bucket}' is not one this service reads {what} from; allowed: {allowed}")
    return bucket, match["namespace"], match["name"]


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

    def prepare(self, request: ImageRequest) -> tuple[ImageRequest, Inputs]:
        """The request with its output size settled, and its inputs; raises `ServiceError`. Slow: run off the loop."""
        if request.image is None:
            return request.sized(request.width or DEFAULT_SIDE, request.height or DEFAULT_SIDE), NO_INPUTS
        image = self._decode("image", request.image, "RGB")
        mask = None
        if request.mask_image is not None:
            mask = self._decode("mask_image", request.mask_image, "RGBA" if request.mask_alpha else "L")
            if (mask.width, mask.height) != (image.width, image.height):
                raise invalid_field("mask_image", f"the mask is {mask.width}x{mask.height} but the image is "
                                                  f"{image.width}x{image.height}: a mask must be its image's size")
        request = request.sized(request.width or image.width // SIDE_STEP * SIDE_STEP,
                                request.height or image.height // SIDE_STEP * SIDE_STEP)
        target = (request.width, request.height)
        image = _resized(image, target, Image.Resampling.LANCZOS)
        if mask is not None:
            mask = _resized(mask, target, Image.Resampling.NEAREST)
            # Black and white as the pipeline reads a mask (white: repaint), cut at half grey; or, in OpenAI's
            # convention, white where the mask is fully transparent. The same area is repainted by the pipeline
            # and pasted back around by `generation.keep_outside_mask`.
            if request.mask_alpha:
                pixels = mask.pixels.getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)
            else:
                pixels = mask.pixels.point(lambda value: 255 if value >= 128 else 0)
            mask = replace(mask, pixels=pixels)
        return request, Inputs(image=image, mask=mask, strength=request.repaint_strength)

    # -- internals

    def _decode(self, field: str, source: str | bytes, mode: str) -> InputImage:
        if isinstance(source, bytes):
            data, uri = source, None
        elif source.startswith("oci://"):
            data, uri = self._read(field, source), source
        else:
            data, uri = decode_base64(base64_payload(source)), None
        kind = "image"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                opened = Image.open(io.BytesIO(data), formats=FORMATS)
                kind = f"{opened.format} image"
                _check_sides(field, *opened.size)  # from the header, before any pixel is decoded
                if mode == "RGBA" and "A" not in opened.getbands() and "transparency" not in opened.info:
                    raise invalid_field(field, "the mask has no alpha channel: send a PNG whose fully transparent "
                                               "pixels mark the area to edit")
                upright = ImageOps.exif_transpose(opened)  # a phone's JPEG is stored sideways; this loads it
                pixels = upright.convert(mode)
        except ServiceError:
            raise
        except UnidentifiedImageError:
            raise invalid_field(field, f"not an image this service reads: send a {', '.join(FORMATS[:-1])} or "
                                       f"{FORMATS[-1]} file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise invalid_field(field, f"the image has over {Image.MAX_IMAGE_PIXELS} pixels; the most is "
                                       f"{MAX_SIDE}x{MAX_SIDE}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise invalid_field(field, f"the {kind} cannot be decoded (damaged or cut short): {exc}") from None
        return InputImage(pixels=pixels, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                          width=pixels.width, height=pixels.height, format=opened.format, uri=uri)

    def _read(self, field: str, uri: str) -> bytes:
        readable = self.allowed_buckets if self.objects is not None else frozenset()
        bucket, namespace, name = allowed_object(field, uri, readable, "inputs", "INPUT_BUCKETS or BUCKET_NAME")
        try:
            return self.objects.read(namespace, bucket, name, MAX_OBJECT_BYTES)
        except ObjectRefused as exc:
            if exc.status == 404:
                raise ServiceError(404, "input_not_found", f"{field}: {exc}", field=field) from None
            raise invalid_field(field, f"cannot read {uri}: {exc}") from None
        except StoreError as exc:
            raise ServiceError(503, "input_unavailable", f"{field}: cannot read {uri} now: {exc}", field=field,
                               retry_after=10) from None


def _check_sides(field: str, width: int, height: int) -> None:
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise invalid_field(field, f"the image is {width}x{height}; each side must be {MIN_SIDE} to {MAX_SIDE} "
                                   "pixels")


def _resized(image: InputImage, size: tuple[int, int], resample: Image.Resampling) -> InputImage:
    if image.pixels.size == size:
        return image
    return replace(image, pixels=image.pixels.resize(size, resample))
