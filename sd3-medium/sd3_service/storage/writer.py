"""Encode generated images, name them, store them, and say where each one is.

The writer's store is a `SpoolingStore`: an image the bucket (or folder) cannot take now is kept on
local disk and answered inline, so writing never loses an image and never fails a request.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass

from sd3_service.spec import NO_INPUTS, Answer, ImageRequest, Inputs, StoredImage
from sd3_service.storage.encoding import EncodedImage, encode_image
from sd3_service.storage.naming import image_name, sidecar_name
from sd3_service.storage.spool import Spool, SpoolingStore
from sd3_service.storage.store import ImageObject, ImageStore, LocalFolderStore


def build_store(settings) -> ImageStore:
    """The Object Storage store when `BUCKET_NAME` is set, else the local folder (no client built here)."""
    if settings.bucket_name:
        from sd3_service.storage.object_storage import ObjectStorageStore  # the oci SDK is slow to import: only if used

        return ObjectStorageStore.from_settings(settings)
    return LocalFolderStore(settings.image_dir)


@dataclass(frozen=True)
class Written:
    """A request's images, encoded and stored (or kept)."""

    files: list[EncodedImage]
    images: list[StoredImage]
    encode_seconds: float
    store_seconds: float


class ImageWriter:
    """Encodes, names and stores a request's images, with their metadata and (optionally) a parameters sidecar.

    Args:
        store: where images go; it keeps what it cannot store.
        object_prefix: prefix of every object name.
        store_params: also store `<request_id>.json` next to the images, with every parameter (prompt too).
    """

    def __init__(self, store: SpoolingStore, object_prefix: str = "sd3/", store_params: bool = False):
        self.store = store
        self.object_prefix = object_prefix
        self.store_params = store_params

    @classmethod
    def from_settings(cls, settings) -> ImageWriter:
        store = SpoolingStore(build_store(settings), Spool(settings.spool_dir))
        return cls(store, object_prefix=settings.object_prefix, store_params=settings.store_params)

    def start(self) -> None:
        """Start uploading what earlier runs kept (and check the store once)."""
        self.store.start()

    def stop(self) -> None:
        self.store.stop(timeout=5)

    def describe(self) -> dict:
        return self.store.describe()

    def makes_links(self) -> bool:
        """Whether stored images get a time-limited read-only link (`RETURN_URL` with Object Storage)."""
        return bool(getattr(self.store.store, "return_url", False))

    def write(self, request: ImageRequest, request_id: str, seed: int, images: list, model: str,
              inputs: Inputs = NO_INPUTS, day: dt.datetime | None = None, adapters: list[dict] | None = None) -> Written:
        """Encode and store `images`, generated for `request` with `seed` (and `inputs`) by `model`.

        `day`: the date in the images' names (the request's, recorded when it was first accepted); today if None.
        `adapters`: the LoRA adapters applied, by name and sha256.
        """
        began = time.perf_counter()
        files = [encode_image(image, request.output_format, request.output_quality) for image in images]
        encoded = time.perf_counter()
        now = day or dt.datetime.now(dt.timezone.utc)
        metadata = image_metadata(request, seed, model, inputs, adapters)
        stored = []
        for index, file in enumerate(files):
            # Only where nothing has the name yet: an object named in an answer never gets other bytes (a
            # takeover makes the same bytes under the same names, and keeps what the first owner stored).
            image = ImageObject(name=image_name(self.object_prefix, request_id, index, file.extension, now),
                                data=file.data, content_type=file.content_type, metadata=metadata,
                                request_id=request_id, if_absent=True)
            result = self.store.put(image)
            where = result.location
            stored.append(StoredImage(
                uri=where.uri, object_name=image.name, bucket=where.bucket, namespace=where.namespace,
                content_type=file.content_type, bytes=len(file.data), sha256=file.sha256,
                width=file.width, height=file.height, stored=result.stored, url=where.url,
                data=None if result.stored else base64.b64encode(file.data).decode("ascii"),
            ))
        if self.store_params:
            self._store_sidecar(request, request_id, seed, stored, metadata, model, now, inputs, adapters)
        return Written(files=files, images=stored, encode_seconds=encoded - began,
                       store_seconds=time.perf_counter() - encoded)

    def as_stored_since(self, response: Answer) -> Answer:
        """An earlier answer, with the images the spool has stored since marked stored (and no inline copy)."""
        if all(image.stored for image in response.images):
            return response
        images = []
        for image in response.images:
            where = None if image.stored else self.store.stored_later(image.object_name)
            images.append(image if where is None else image.model_copy(
                update={"stored": True, "data": None, "uri": where.uri, "url": where.url}))
        return response.model_copy(update={"images": images})

    def with_spooled_data(self, answer: Answer) -> Answer:
        """An answer held without image data (`without_data`), with each image still waiting in the spool inline
        again, read from disk: what the first caller got. Reads files: call off the event loop."""
        images = []
        for image in answer.images:
            data = None if image.stored or image.data is not None else self.store.spooled(image.object_name)
            images.append(image if data is None else image.model_copy(
                update={"data": base64.b64encode(data).decode("ascii")}))
        return answer.model_copy(update={"images": images})

    def read(self, image: StoredImage) -> bytes:
        """The bytes of an image an earlier answer named: inline, in the spool, or from the store."""
        if image.data is not None:
            return base64.b64decode(image.data)
        return self.store.read(image.object_name)

    def _store_sidecar(self, request, request_id, seed, stored, metadata, model, now, inputs, adapters) -> None:
        """Store `<request_id>.json`: the body that reproduces these images, and what they are."""
        # Sent back to /predict as the body (with the same `image` and `mask_image`, which are described in
        # `inputs` but never copied here), this makes the same images on the same hardware and software.
        parameters = {name: value for name, value in request.parameters(seed).items()
                      if name not in ("image", "mask_image", "mask_alpha", "webhook", "webhook_events_filter")}
        record = {
            "request_id": request_id,
            "created": now.isoformat(),
            "model": model,
            "parameters": parameters,
            "inputs": inputs.describe(),
            "images": [{"object_name": s.object_name, "sha256": s.sha256, "bytes": s.bytes} for s in stored],
        }
        if adapters:
            record["loras"] = adapters
        self.store.put(ImageObject(name=sidecar_name(self.object_prefix, request_id, now),
                                   data=json.dumps(record, indent=1).encode(), content_type="application/json",
                                   metadata=metadata, request_id=request_id, if_absent=True))


def image_metadata(request: ImageRequest, seed: int, model: str, inputs: Inputs = NO_INPUTS,
                   adapters: list[dict] | None = None) -> dict[str, str]:
    """Generation parameters stored with each image (never the prompt text, never an input image's bytes)."""
    metadata = {
        "seed": str(seed),
        "steps": str(request.num_inference_steps),
        "guidance": str(request.guidance_scale),
        "width": str(request.width),
        "height": str(request.height),
        "model": model,
        "prompt-sha256": hashlib.sha256(request.prompt.encode()).hexdigest(),
    }
    if inputs.image is not None:
        metadata.update({"mode": request.mode, "strength": str(inputs.strength), "input-sha256": inputs.image.sha256,
                         "input-bytes": str(inputs.image.bytes),
                         "input-size": f"{inputs.image.width}x{inputs.image.height}"})
    if inputs.mask is not None:
        metadata.update({"mask-sha256": inputs.mask.sha256, "mask-bytes": str(inputs.mask.bytes)})
    if request.user is not None:
        metadata["user-sha256"] = hashlib.sha256(request.user.encode()).hexdigest()
    fused = [adapter for adapter in adapters or () if adapter.get("fused")]
    for index, adapter in enumerate(fused):
        metadata[f"lora-fused-{index}"] = f"{adapter['sha256']}:{adapter['scale']}"
    for index, adapter in enumerate(adapter for adapter in adapters or () if not adapter.get("fused")):
        metadata[f"lora-{index}"] = f"{adapter['sha256']}:{adapter['scale']}"
    return metadata
