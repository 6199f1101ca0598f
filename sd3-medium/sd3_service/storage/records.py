"""Small JSON records that several processes update safely: create-if-absent and replace-if-unchanged.

The request ledger (`ledger.py`) keeps one record per request id in the image store: Object Storage's
conditional requests (`if-none-match: *`, `if-match: <etag>`, 412 otherwise) in a bucket
(`ObjectStorageStore` implements `RecordStore`), and `LocalRecords` in the local image folder, where an
exclusive create (a hard link that fails if the name exists) and a file lock on the records' folder do
the same for every worker on one machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from sd3_service.storage.store import StoreError


class RecordExists(Exception):
    """A create found a record under that name already."""


class RecordChanged(Exception):
    """A replace found the record changed (or gone) since it was read: someone else wrote it."""


class RecordStore(Protocol):
    """Where records live; every method raises `StoreError` when the store cannot be reached."""

    def create_record(self, name: str, data: bytes) -> str:
        """Write a record that must not exist yet; its etag. `RecordExists` if it does."""

    def read_record(self, name: str) -> tuple[bytes, str] | None:
        """The record and its etag, or None if there is none."""

    def replace_record(self, name: str, data: bytes, etag: str) -> str:
        """Replace the record read with `etag`; the new etag. `RecordChanged` if it changed since."""


def content_etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalRecords:
    """Records as files under a folder (`IMAGE_DIR`), shared by every process on the machine."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()

    def create_record(self, name: str, data: bytes) -> str:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._written(path, data)
            try:
                os.link(tmp, path)  # atomic, and fails if the name exists: the exclusive create
            except FileExistsError:
                raise RecordExists(name) from None
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return content_etag(data)

    def read_record(self, name: str) -> tuple[bytes, str] | None:
        path = self._path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return data, content_etag(data)

    def replace_record(self, name: str, data: bytes, etag: str) -> str:
        path = self._path(name)
        with self._locked(path):
            self._check(path, etag)
            try:
                os.replace(self._written(path, data), path)
            except OSError as exc:
                raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return content_etag(data)

    # -- internals

    def _path(self, name: str) -> Path:
        return self.root / name

    @staticmethod
    def _written(path: Path, data: bytes) -> str:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        return tmp.name

    @staticmethod
    def _check(path: Path, etag: str) -> None:
        try:
            current = content_etag(path.read_bytes())
        except FileNotFoundError:
            raise RecordChanged(path.name) from None
        if current != etag:
            raise RecordChanged(path.name)

    @contextmanager
    def _locked(self, path: Path):
        """An exclusive lock for read-compare-write on the records of one folder. The record itself is replaced,
        so the lock is taken on its folder: no lock file is left beside the records."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise StoreError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # closing releases the lock
