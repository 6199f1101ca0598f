"""LoRA adapters a request asks for: found, fetched, checked, before any device is touched.

An adapter is named by the catalog's stem (a `<name>.safetensors` file in `LORA_DIR`, shipped in the
artifact's `loras/` folder) or by `oci://<bucket>@<namespace>/<object>` in one of `LORA_BUCKETS`, read with
the service's own credentials. A bucket adapter is downloaded once per instance into `LORA_CACHE_DIR`
(outside the read-only artifact), kept by its content's sha256, and the cache holds at most
`LORA_CACHE_MAX_BYTES`: the least recently used files that no device has loaded go first. Later requests
only ask the bucket whether the object changed (its ETag). Every adapter is checked once per content, the
way diffusers reads it (`lora_files.py`). Every refusal is a `ServiceError` naming `loras.<i>`: 404 for a
name that is not there, 400 for what the caller can fix, 503 while Object Storage cannot be reached.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sd3_service.errors import ServiceError, invalid_field
from sd3_service.inputs import allowed_object
from sd3_service.lora_files import adapter_misfit
from sd3_service.spec import LoraChoice, ResolvedLora
from sd3_service.storage.store import ObjectRefused, StoreError

log = logging.getLogger("sd3.loras")

CATALOG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FETCH_THREADS = 2  # downloads and checks of adapters, apart from the I/O threads that renew leases and store images
STALE_TEMPORARY_SECONDS = 3600  # a `.tmp-` file this old was left by a process killed while it wrote


class AdapterObjects(Protocol):
    def read(self, namespace: str, bucket: str, name: str, max_bytes: int) -> bytes:
        """The object's bytes; `ObjectRefused` when it cannot be read, `StoreError` when the store is down."""

    def etag(self, namespace: str, bucket: str, name: str) -> str:
        """The object's ETag (a HEAD); the same errors as `read`."""


@dataclass(frozen=True)
class Fetched:
    """A bucket adapter kept in the cache: the ETag it had, and its content's sha256."""

    etag: str
    sha256: str


class AdapterCache:
    """Bucket adapters on local disk by content (`<sha256>.safetensors`), at most `max_bytes` in all.

    Use marks a file recently used (its mtime, so the order survives a restart); past the bound, the least recently
    used files go first, except those `in_use` names (loaded on a device, or about to be).
    """

    def __init__(self, folder: Path, max_bytes: int, in_use: Callable[[], set[str]] = set):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.in_use = in_use
        self._lock = threading.Lock()
        self._remove_stale_temporaries()

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.safetensors"

    def use(self, sha256: str) -> Path | None:
        """The cached file of this content, marked as just used; None when it is not (or no longer) cached."""
        path = self.path(sha256)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def keep(self, sha256: str, data: bytes) -> Path:
        """Write a downloaded adapter (whole, or not at all), then evict down to the bound."""
        path = self.path(sha256)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(dir=self.folder, prefix=".tmp-", delete=False)
        try:
            with tmp:
                tmp.write(data)
            os.replace(tmp.name, path)
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)  # a full disk leaves nothing half-written behind
            raise
        self.evict(keep={sha256})
        return path

    def evict(self, keep: set[str] = frozenset()) -> list[str]:
        """Remove the least recently used files beyond `max_bytes` (never those in use or in `keep`); the sha256s
        of those removed."""
        with self._lock:
            files = []
            for path in self.folder.glob("*.safetensors"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                files.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in files)
            if total <= self.max_bytes:
                return []
            protected = set(keep) | set(self.in_use())
            removed = []
            for _, size, path in sorted(files):  # least recently used first
                if total <= self.max_bytes:
                    break
                if path.stem in protected:
                    continue
                path.unlink(missing_ok=True)
                total -= size
                removed.append(path.stem)
            if removed:
                log.info("Removed %d LoRA adapter(s) from %s, least recently used beyond LORA_CACHE_MAX_BYTES=%d",
                         len(removed), self.folder, self.max_bytes)
            return removed

    def _remove_stale_temporaries(self) -> None:
        for path in self.folder.glob(".tmp-*"):
            try:
                if time.time() - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                    path.unlink()
            except FileNotFoundError:
                pass


class LoraLibrary:
    """Finds, fetches and checks the adapters a request names.

    Args:
        catalog: the folder of `<name>.safetensors` adapters (`LORA_DIR`).
        cache: where bucket adapters are kept, by sha256 (`LORA_CACHE_DIR`, bounded by `LORA_CACHE_MAX_BYTES`);
            needed only with `objects`.
        allowed_buckets: the buckets `oci://` adapters may come from (`LORA_BUCKETS`).
        objects: reads them with the service's own credentials; None when no bucket is allowed.
        max_bytes: the largest adapter file taken (`LORA_MAX_BYTES`).
        modules: the model's layers an adapter must fit, `{"transformer.x.to_q": (in, out)}`; called when first
            needed (the model is loaded by then).
        loaded: the sha256 of every adapter loaded on a device, which the cache keeps.
    """

    def __init__(self, catalog: Path, cache: AdapterCache | None = None, allowed_buckets: frozenset[str] = frozenset(),
                 objects: AdapterObjects | None = None, max_bytes: int = 512 * 1024 * 1024,
                 modules: Callable[[], dict[str, tuple[int, int]] | None] = lambda: None,
                 loaded: Callable[[], set[str]] = set):
        self.catalog = Path(catalog)
        self.cache = cache
        self.allowed_buckets = allowed_buckets
        self.objects = objects
        self.max_bytes = max_bytes
        self.modules = modules
        self._fetched: dict[str, Fetched] = {}  # oci:// URI -> what the cache holds for it
        self._checked: dict[str, str | None] = {}  # sha256 -> None (fits) or why it does not
        self._digests: dict[Path, tuple[float, int, str]] = {}  # catalog file -> (mtime, size, sha256)
        self._pinned: Counter[str] = Counter()  # sha256 -> requests resolved with it and not generated yet
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="sd3-lora")
        self._loaded = loaded
        if cache is not None:
            cache.in_use = self.in_use

    async def fetch(self, choices: tuple[LoraChoice, ...]) -> list[ResolvedLora]:
        """`resolve` on the library's own threads; each adapter is kept in the cache until `release`."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, self.resolve, choices)

    def release(self, adapters: list[ResolvedLora]) -> None:
        """The request that resolved these has generated (or failed): its files may be evicted again."""
        with self._lock:
            self._pinned.subtract(adapter.sha256 for adapter in adapters)
            self._pinned = +self._pinned

    def in_use(self) -> set[str]:
        """What the cache must keep: adapters loaded on a device, or resolved for a request not generated yet."""
        with self._lock:
            pinned = set(self._pinned)
        return pinned | set(self._loaded())

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def resolve(self, choices: tuple[LoraChoice, ...]) -> list[ResolvedLora]:
        """The adapters as files on this machine, identified by content; `ServiceError` naming `loras.<i>`.
        Slow the first time an adapter is seen (a download, a check): run off the event loop."""
        resolved: list[ResolvedLora] = []
        try:
            for index, choice in enumerate(choices):
                field = f"loras.{index}"
                path, sha256 = self._fetch(field, choice.name) if choice.name.startswith("oci://") else \
                    self._from_catalog(field, choice.name)
                self._check(field, path, sha256)
                with self._lock:  # kept from eviction while the next one downloads, and until `release`
                    self._pinned[sha256] += 1
                resolved.append(ResolvedLora(name=choice.name, sha256=sha256, scale=choice.scale, path=str(path)))
            if len({adapter.sha256 for adapter in resolved}) < len(resolved):
                raise invalid_field("loras", "the same adapter is named twice: name it once, with the scale wanted")
        except BaseException:
            self.release(resolved)
            raise
        return resolved

    def describe(self) -> list[dict]:
        """The catalog, for /health: each adapter's name and size."""
        return [{"name": path.stem, "bytes": path.stat().st_size} for path in self._catalog_files()]

    # -- finding

    def _catalog_files(self) -> list[Path]:
        if not self.catalog.is_dir():
            return []
        return sorted(path for path in self.catalog.glob("*.safetensors") if path.is_file())

    def _from_catalog(self, field: str, name: str) -> tuple[Path, str]:
        path = self.catalog / f"{name}.safetensors"
        if not CATALOG_NAME.match(name) or not path.is_file():
            known = ", ".join(path.stem for path in self._catalog_files()) or "none"
            raise ServiceError(404, "lora_not_found", f"{field}: no adapter '{name}' in this deployment's catalog "
                                                      f"(known: {known}); or name one as oci://<bucket>@<namespace>/"
                                                      "<object>", field=field)
        stat = path.stat()
        if stat.st_size > self.max_bytes:
            raise invalid_field(field, f"'{name}' is {stat.st_size} bytes; adapters may be at most {self.max_bytes}")
        with self._lock:
            known = self._digests.get(path)
        if known is None or known[:2] != (stat.st_mtime, stat.st_size):
            known = (stat.st_mtime, stat.st_size, _file_sha256(path))
            with self._lock:
                self._digests[path] = known
        return path, known[2]

    def _fetch(self, field: str, uri: str) -> tuple[Path, str]:
        readable = self.allowed_buckets if self.objects is not None else frozenset()
        bucket, namespace, name = allowed_object(field, uri, readable, "adapters", "LORA_BUCKETS")
        with self._lock:
            fetched = self._fetched.get(uri)
        try:
            etag = self.objects.etag(namespace, bucket, name)
            if fetched is not None and fetched.etag == etag and (path := self.cache.use(fetched.sha256)):
                return path, fetched.sha256
            data = self.objects.read(namespace, bucket, name, self.max_bytes)
        except ObjectRefused as exc:
            if exc.status == 404:
                raise ServiceError(404, "lora_not_found", f"{field}: {exc}", field=field) from None
            if exc.status == 413:
                raise invalid_field(field, f"the adapter is over {self.max_bytes} bytes (LORA_MAX_BYTES)") from None
            raise invalid_field(field, f"cannot read {uri}: {exc}") from None
        except StoreError as exc:
            if fetched is not None and (path := self.cache.use(fetched.sha256)):
                log.warning("Cannot ask Object Storage whether %s changed (%s): using the copy fetched before",
                            uri, exc)
                return path, fetched.sha256
            raise ServiceError(503, "lora_unavailable", f"{field}: cannot read {uri} now: {exc}", field=field,
                               retry_after=10) from None
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.cache.use(sha256)
        if path is None:
            path = self.cache.keep(sha256, data)
            log.info("Fetched LoRA adapter %s (%d bytes, sha256 %s)", uri, len(data), sha256[:16])
        with self._lock:
            self._fetched[uri] = Fetched(etag=etag, sha256=sha256)
        return path, sha256

    # -- checking

    def _check(self, field: str, path: Path, sha256: str) -> None:
        with self._lock:
            known = self._checked.get(sha256, "unchecked")
        if known == "unchecked":
            modules = self.modules()
            if modules is None:
                raise ServiceError(503, "not_ready", "the model is still loading; adapters are checked against it",
                                   retry_after=10)
            known = adapter_misfit(path, modules)
            with self._lock:
                self._checked[sha256] = known
        if known is not None:
            raise invalid_field(field, known)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
