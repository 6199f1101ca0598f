"""LoRA adapters a request asks for: found, fetched, checked, before any device is touched.

An adapter is named by the catalog's stem (a `<name>.safetensors` file in `LORA_DIR`, shipped in the
artifact's `loras/` folder) or by `oci://<bucket>@<namespace>/<object>` in one of `LORA_BUCKETS`, read with
the service's own credentials. A bucket adapter is downloaded once per instance into `LORA_CACHE_DIR`
(outside the read-only artifact), kept by its content's sha256; later requests only ask the bucket
whether the object changed (its ETag). Every adapter is checked once per content: a safetensors file no
larger than `LORA_MAX_BYTES` whose keys are LoRA weights of this model's modules, with their shapes.
Every refusal is a `ServiceError` naming `loras[i]`: 404 for a name that is not there, 400 for what the
caller can fix, 503 while Object Storage cannot be reached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sd3_service.errors import ServiceError, invalid_field
from sd3_service.inputs import allowed_object
from sd3_service.spec import LoraChoice, ResolvedLora
from sd3_service.storage.store import ObjectRefused, StoreError

log = logging.getLogger("sd3.loras")

CATALOG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the format's own cap on its JSON header


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


class LoraLibrary:
    """Finds, fetches and checks the adapters a request names.

    Args:
        catalog: the folder of `<name>.safetensors` adapters (`LORA_DIR`).
        cache: where bucket adapters are kept, by sha256 (`LORA_CACHE_DIR`).
        allowed_buckets: the buckets `oci://` adapters may come from (`LORA_BUCKETS`).
        objects: reads them with the service's own credentials; None when no bucket is allowed.
        max_bytes: the largest adapter file taken (`LORA_MAX_BYTES`).
        modules: the model's module shapes an adapter must fit, `{"transformer.x.to_q": (in, out)}`; called
            when first needed (the model is loaded by then).
    """

    def __init__(self, catalog: Path, cache: Path, allowed_buckets: frozenset[str] = frozenset(),
                 objects: AdapterObjects | None = None, max_bytes: int = 512 * 1024 * 1024,
                 modules: Callable[[], dict[str, tuple[int, int]] | None] = lambda: None):
        self.catalog = Path(catalog)
        self.cache = Path(cache)
        self.allowed_buckets = allowed_buckets
        self.objects = objects
        self.max_bytes = max_bytes
        self.modules = modules
        self._fetched: dict[str, Fetched] = {}  # oci:// URI -> what the cache holds for it
        self._checked: dict[str, str | None] = {}  # sha256 -> None (fits) or why it does not
        self._digests: dict[Path, tuple[float, int, str]] = {}  # catalog file -> (mtime, size, sha256)
        self._lock = threading.Lock()

    def resolve(self, choices: tuple[LoraChoice, ...]) -> list[ResolvedLora]:
        """The adapters as files on this machine, identified by content; `ServiceError` naming `loras[i]`.
        Slow the first time an adapter is seen (a download, a check): run off the event loop."""
        resolved = []
        for index, choice in enumerate(choices):
            field = f"loras.{index}"
            path, sha256 = self._fetch(field, choice.name) if choice.name.startswith("oci://") else \
                self._from_catalog(field, choice.name)
            self._check(field, path, sha256)
            resolved.append(ResolvedLora(name=choice.name, sha256=sha256, scale=choice.scale, path=str(path)))
        if len({adapter.sha256 for adapter in resolved}) < len(resolved):
            raise invalid_field("loras", "the same adapter is named twice: name it once, with the scale wanted")
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
            if fetched is not None and fetched.etag == etag and self._cached(fetched.sha256).is_file():
                return self._cached(fetched.sha256), fetched.sha256
            data = self.objects.read(namespace, bucket, name, self.max_bytes)
        except ObjectRefused as exc:
            if exc.status == 404:
                raise ServiceError(404, "lora_not_found", f"{field}: {exc}", field=field) from None
            if exc.status == 413:
                raise invalid_field(field, f"the adapter is over {self.max_bytes} bytes (LORA_MAX_BYTES)") from None
            raise invalid_field(field, f"cannot read {uri}: {exc}") from None
        except StoreError as exc:
            if fetched is not None and self._cached(fetched.sha256).is_file():
                log.warning("Cannot ask Object Storage whether %s changed (%s): using the copy fetched before",
                            uri, exc)
                return self._cached(fetched.sha256), fetched.sha256
            raise ServiceError(503, "lora_unavailable", f"{field}: cannot read {uri} now: {exc}", field=field,
                               retry_after=10) from None
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._cached(sha256)
        if not path.is_file():
            self._keep(path, data)
            log.info("Fetched LoRA adapter %s (%d bytes, sha256 %s)", uri, len(data), sha256[:16])
        with self._lock:
            self._fetched[uri] = Fetched(etag=etag, sha256=sha256)
        return path, sha256

    def _cached(self, sha256: str) -> Path:
        return self.cache / f"{sha256}.safetensors"

    def _keep(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    # -- checking

    def _check(self, field: str, path: Path, sha256: str) -> None:
        with self._lock:
            known = self._checked.get(sha256, "unchecked")
        if known == "unchecked":
            known = self._misfit(path)
            with self._lock:
                self._checked[sha256] = known
        if known is not None:
            raise invalid_field(field, known)

    def _misfit(self, path: Path) -> str | None:
        """Why the file is not a LoRA adapter of this model, or None when it fits."""
        try:
            shapes = safetensors_shapes(path)
        except ValueError as exc:
            return f"not a safetensors file: {exc}"
        modules = self.modules()
        if modules is None:
            raise ServiceError(503, "not_ready", "the model is still loading; adapters are checked against it",
                               retry_after=10)
        return lora_misfit(shapes, modules)


def lora_misfit(shapes: dict[str, list[int]], modules: dict[str, tuple[int, int]]) -> str | None:
    """Why LoRA weights of these shapes do not fit these modules (in, out features), or None when they do.

    The keys are diffusers' (`transformer.<module>.lora_A.weight` of shape [rank, in], `...lora_B.weight` of
    shape [out, rank]), as `save_lora_weights` writes them and diffusers' SD3 DreamBooth LoRA script trains them.
    """
    if not shapes:
        return "the file holds no weights"
    targets: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        suffix = next((suffix for suffix in LORA_SUFFIXES if key.endswith(suffix)), None)
        if suffix is None:
            return (f"not a LoRA adapter of this model: '{key}' is not a LoRA weight in diffusers' names "
                    "(`transformer.<module>.lora_A.weight`)")
        targets.setdefault(key[: -len(suffix)], {})[suffix] = shape
    for module, parts in sorted(targets.items()):
        if module not in modules:
            return (f"not a LoRA adapter of this model: it adapts '{module}', which Stable Diffusion 3 Medium does "
                    "not have (an adapter for another model, such as SDXL or Flux?)")
        if set(parts) < {".lora_A.weight", ".lora_B.weight"}:
            return f"'{module}' has only part of a LoRA pair (lora_A and lora_B)"
        in_features, out_features = modules[module]
        down, up = parts[".lora_A.weight"], parts[".lora_B.weight"]
        if len(down) != 2 or len(up) != 2 or down[1] != in_features or up[0] != out_features or down[0] != up[1]:
            return (f"not a LoRA adapter of this model: '{module}' is {in_features} -> {out_features} features, "
                    f"the adapter's weights are {down} and {up} (an adapter for another model?)")
    return None


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from a safetensors file's header (no tensor is read); `ValueError` if it is not one."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError("too short")
        size = int.from_bytes(prefix, "little")
        if not 2 <= size <= SAFETENSORS_HEADER_LIMIT or size > path.stat().st_size - 8:
            raise ValueError("no safetensors header")
        try:
            header = json.loads(file.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a table of tensors")
    shapes = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise ValueError(f"'{key}' has no shape")
        shapes[key] = entry["shape"]
    return shapes


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
