"""Where generated images are kept: one small interface, two implementations.

`LocalFolderStore` (the embedded default) writes under `IMAGE_DIR`; the Object Storage store
(`object_storage.py`) writes to a bucket. Everything above them sees only `ImageStore`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class StoreError(Exception):
    """Storing an image failed; the caller keeps the bytes. `status`: the HTTP status the store answered, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ObjectRefused(Exception):
    """The store answered that an object cannot be read (missing, not allowed, too large): retrying will not help.

    Args:
        status: the HTTP status that says why (404, 403, 401, 400; 413 for an object over the size limit).
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageObject:
    """An encoded image ready to be stored, with the name the server chose for it."""

    name: str
    data: bytes
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)
    request_id: str = ""  # for log lines about it
    if_absent: bool = False  # store it only where no object has its name yet (a request's first record)


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

    def get(self, name: str) -> bytes:
        """The bytes of an object this store holds; `ObjectRefused` when there is none, `StoreError` when the
        store cannot be reached."""

    def check(self) -> None:
        """Raise `StoreError` when the store cannot take images now (one cheap call, no image)."""

    def destination(self) -> dict[str, str | None]:
        """Where this store puts images (kind, bucket and namespace, or folder): recorded with each kept image."""

    def describe(self) -> dict[str, str]:
        """A short description for logs and /health (no secrets)."""


def same_destination(recorded: dict, current: dict) -> bool:
    """Whether an image kept for `recorded` may go to `current`; a namespace not known yet matches any."""
    keys = set(recorded) | set(current)
    return all(recorded.get(key) == current.get(key) or (key == "namespace" and None in (recorded.get(key),
               current.get(key))) for key in keys)


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
            if image.if_absent:
                try:
                    os.link(tmp.name, path)  # fails if the name exists: what is there stays
                except FileExistsError:
                    pass
                os.unlink(tmp.name)
            else:
                os.replace(tmp.name, path)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return self.location(image.name)

    def get(self, name: str) -> bytes:
        path = self.root / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectRefused(404, f"{path} does not exist") from None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def check(self) -> None:
        existing = next(folder for folder in (self.root, *self.root.parents) if folder.exists())
        if not (existing.is_dir() and os.access(existing, os.W_OK)):
            raise StoreError(f"cannot write to {self.root}")

    def destination(self) -> dict[str, str | None]:
        return {"kind": "local", "folder": str(self.root)}

    def describe(self) -> dict[str, str]:
        return {"kind": "local", "path": str(self.root)}
