"""Where generated images are kept: one small interface, two implementations.

`LocalFolderStore` (the embedded default) writes under `IMAGE_DIR`; the Object Storage store
(`object_storage.py`) writes to a bucket. The service only ever sees `ImageStore`.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class StoreError(Exception):
    """Storing an image failed; the caller keeps the bytes."""


@dataclass(frozen=True)
class ImageObject:
    """An encoded image ready to be stored, with the name the server chose for it."""

    name: str
    data: bytes
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Location:
    """Where an object is (or will be) once stored."""

    uri: str
    bucket: str | None = None
    namespace: str | None = None
    url: str | None = None


class ImageStore(Protocol):
    """Keeps image bytes under server-made names."""

    def location(self, name: str) -> Location:
        """Where `name` is once stored (known before storing, so a failed store can still name it)."""

    def put(self, image: ImageObject) -> Location:
        """Store the image; raise `StoreError` when it could not be stored."""

    def describe(self) -> dict[str, str]:
        """A short description for logs and /health (no secrets)."""


def object_name(prefix: str, request_id: str, index: int, extension: str, when: dt.datetime) -> str:
    """`<prefix><yyyy>/<mm>/<dd>/<request_id>-<index>.<ext>`: names come from the server only."""
    return f"{prefix}{when:%Y/%m/%d}/{request_id}-{index}.{extension}"


class LocalFolderStore:
    """Writes images into a folder (`IMAGE_DIR`), atomically: a reader never sees half a file."""

    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()

    def location(self, name: str) -> Location:
        return Location(uri=(self.root / name).as_uri())

    def put(self, image: ImageObject) -> Location:
        path = self.root / image.name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as tmp:
                tmp.write(image.data)
            os.replace(tmp.name, path)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return self.location(image.name)

    def describe(self) -> dict[str, str]:
        return {"kind": "local", "path": str(self.root)}


def build_store(settings) -> ImageStore:
    """The Object Storage store when `BUCKET_NAME` is set, else the local folder (no client built here)."""
    if settings.bucket_name:
        from sd3_service.object_storage import ObjectStorageStore

        return ObjectStorageStore.from_settings(settings)
    return LocalFolderStore(settings.image_dir)
