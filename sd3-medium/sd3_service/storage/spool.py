"""No image is lost: what the store could not take waits on local disk, and a background thread uploads it.

`Spool` is a folder outside the read-only artifact (`SPOOL_DIR`), one file per image, written
atomically and fsynced, so it survives a crash or restart. Each file records where its image was
meant to go (the store's kind, bucket and namespace, or folder): it is uploaded there and nowhere else.
`SpoolingStore` wraps the real store: its `put` keeps what failed and says whether the image was
stored, the uploader stores kept images later under the names already answered and deletes a file
only after its upload succeeded, and, while the store is known to fail, `put` keeps at once instead of
spending every request's retry budget on a bucket that is down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from sd3_service.metrics import METRICS
from sd3_service.storage.store import ImageObject, ImageStore, Location, StoreError, same_destination

log = logging.getLogger("sd3.spool")

SUFFIX = ".spooled"
# Names the uploader stored, remembered so that a repeated request_id can say so; more than the
# answer cache (1024 requests by default) holds images for.
STORED_LATER_MEMORY = 8192


def failure_reason(exc: BaseException) -> str:
    """What /health and the log say about a failed store call: a StoreError's own words, else the type too."""
    return str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"


class SpoolCorrupt(Exception):
    """A spooled file cannot be read back (it is set aside, never deleted)."""


@dataclass(frozen=True)
class KeptImage:
    """A spooled image and the destination it was answered for."""

    image: ImageObject
    destination: dict


@dataclass(frozen=True)
class PutResult:
    """What became of an image handed to `SpoolingStore.put`."""

    location: Location  # where it is, or will be once the spool has uploaded it
    stored: bool  # False: kept in the spool (the caller answers it inline)


class Spool:
    """A folder of images waiting to be stored: `<sha256>.spooled` holds a JSON line, then the bytes."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def path(self, name: str, destination: dict) -> Path:
        """Where an image named `name` for `destination` is kept."""
        key = json.dumps([name, destination], sort_keys=True).encode()
        return self.root / (hashlib.sha256(key).hexdigest() + SUFFIX)

    def keep(self, image: ImageObject, destination: dict) -> Path:
        """Write the image durably, with where it must go; keeping it again for the same place replaces the file."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(image.name, destination)
        header = {"name": image.name, "content_type": image.content_type, "metadata": image.metadata,
                  "request_id": image.request_id, "destination": destination, "if_absent": image.if_absent,
                  "sha256": hashlib.sha256(image.data).hexdigest(), "kept_at": time.time()}
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".tmp-", delete=False) as tmp:
            tmp.write(json.dumps(header).encode() + b"\n" + image.data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
        _fsync_folder(self.root)  # the rename itself must survive a power cut too
        return path

    def pending(self) -> list[Path]:
        """Spooled files, oldest first."""
        entries = []
        for path in self.root.glob("*" + SUFFIX):
            try:
                entries.append((path.stat().st_mtime, path))
            except FileNotFoundError:
                pass  # uploaded and removed meanwhile
        return [path for _, path in sorted(entries)]

    def __len__(self) -> int:
        return len(self.pending())

    def load(self, path: Path) -> KeptImage:
        """The image a spooled file holds and its destination; `SpoolCorrupt` if it does not check out."""
        raw = path.read_bytes()
        line, _, data = raw.partition(b"\n")
        try:
            header = json.loads(line)
            intact = hashlib.sha256(data).hexdigest() == header["sha256"]
            image = ImageObject(name=header["name"], data=data, content_type=header["content_type"],
                                metadata=header.get("metadata") or {}, request_id=header.get("request_id") or "",
                                if_absent=bool(header.get("if_absent")))
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolCorrupt(f"{path}: unreadable header ({exc})") from None
        if not intact:
            raise SpoolCorrupt(f"{path}: the bytes do not match their sha256")
        # A file from before destinations were recorded has none: it matches no store and is left alone.
        return KeptImage(image=image, destination=header.get("destination") or {"kind": "unrecorded"})

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def set_aside(self, path: Path) -> Path | None:
        """Move an unreadable file out of the queue (kept for a human to look at); None if another worker did."""
        target = self.root / "corrupt" / path.name
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        return target

    def discard_partial_writes(self, older_than_seconds: float = 60) -> None:
        """Delete temporary files a crash left half-written (their request never got an answer)."""
        for tmp in self.root.glob(".tmp-*"):
            try:
                if time.time() - tmp.stat().st_mtime > older_than_seconds:
                    tmp.unlink()
            except FileNotFoundError:
                pass


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolingStore:
    """The real store, plus the spool for what it could not take; the image writer's only store.

    Args:
        store: the real store (Object Storage or local folder).
        spool: where failed images wait.
        retry_min_seconds, retry_max_seconds: the background uploader's backoff between failed attempts.
    """

    def __init__(self, store: ImageStore, spool: Spool, retry_min_seconds: float = 1.0,
                 retry_max_seconds: float = 30.0):
        self.store = store
        self.spool = spool
        self.retry_min_seconds = retry_min_seconds
        self.retry_max_seconds = retry_max_seconds
        self.state = "unchecked"  # "ok" | "failing"; "unchecked" until the first check or upload
        self.error: str | None = None
        self._wake = threading.Event()
        self._back = threading.Event()  # the store answered another caller: retry now, not after the backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stored_later: OrderedDict[str, Location] = OrderedDict()
        self._held: dict[Path, KeptImage] = {}  # spooled for another destination: never uploaded here
        self._lock = threading.Lock()

    def location(self, name: str) -> Location:
        return self.store.location(name)

    def put(self, image: ImageObject) -> PutResult:
        """Store the image, or keep it in the spool and say so; never raises, never loses the image."""
        if self.state == "failing":
            # Known down: keep it now; the uploader probes the store and takes over this image.
            log.warning("[%s] Keeping %s for later: the store still fails (%s)", image.request_id, image.name,
                        self.error)
            return self._keep(image)
        try:
            location = self.store.put(image)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the image is kept, never lost
            if isinstance(exc, StoreError):
                log.warning("[%s] Storing %s failed (%s): keeping it for a later retry", image.request_id,
                            image.name, exc)
            else:  # a bug in a store, or an SDK error it did not expect: worth its traceback
                log.exception("[%s] Storing %s failed unexpectedly: keeping it for a later retry", image.request_id,
                              image.name)
            METRICS.store_failures.inc()
            self._failing(failure_reason(exc))
            return self._keep(image)
        self._ok()
        return PutResult(location=location, stored=True)

    def spooled(self, name: str) -> bytes | None:
        """An image's bytes while it waits in the spool (read from disk), else None."""
        try:
            return self.spool.load(self.spool.path(name, self.store.destination())).image.data
        except (FileNotFoundError, SpoolCorrupt):
            return None

    def read(self, name: str) -> bytes:
        """An image's bytes: from the spool while it waits there, else from the store (`ObjectRefused`,
        `StoreError` as the store raises them)."""
        try:
            return self.spool.load(self.spool.path(name, self.store.destination())).image.data
        except (FileNotFoundError, SpoolCorrupt):
            return self.store.get(name)

    def describe(self) -> dict:
        about = dict(self.store.describe())
        about.update(state=self.state, spooled=len(self.spool), spool_dir=str(self.spool.root))
        if self.error:
            about["error"] = self.error
        with self._lock:
            held = [{"object_name": kept.image.name, "destination": kept.destination, "file": str(path)}
                    for path, kept in self._held.items() if path.exists()]
        if held:
            about["held_for_other_destinations"] = held
        return about

    def stored_later(self, name: str) -> Location | None:
        """Where the uploader stored a spooled image, or None while it waits (or was stored before a restart)."""
        with self._lock:
            return self._stored_later.get(name)

    def start(self) -> threading.Thread:
        """Check the store once (one clear log line if it is unusable), then upload spooled images in the background."""
        self._thread = threading.Thread(target=self._run, name="sd3-spool", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        self._back.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def nudge(self) -> None:
        """The store answered another caller (the ledger) after failing: retry the uploads now, not after the
        uploader's backoff, so that what the outage kept (answers' records included) is stored promptly."""
        self._back.set()

    def upload_pending(self) -> bool:
        """Upload spooled images meant for this store, oldest first, stopping at the first failure.

        Returns True when every one of them was stored.
        """
        destination = self.store.destination()
        for path in self.spool.pending():
            if self._stop.is_set():
                return False
            with self._lock:
                if path in self._held:
                    continue
            try:
                kept = self.spool.load(path)
            except FileNotFoundError:
                continue  # another worker uploaded it meanwhile
            except SpoolCorrupt as exc:
                moved = self.spool.set_aside(path)
                if moved is not None:  # else another worker set it aside first
                    log.error("Setting aside an unreadable spooled file (%s): %s", exc, moved)
                continue
            image = kept.image
            if not same_destination(kept.destination, destination):
                with self._lock:
                    self._held[path] = kept
                log.warning("[%s] Spooled %s was answered for %s, not this store (%s): leaving it in %s",
                            image.request_id, image.name, kept.destination, destination, path)
                continue
            try:
                location = self.store.put(image)
            except Exception as exc:  # noqa: BLE001 - the uploader must outlive a store's bug; the file stays
                METRICS.store_failures.inc()
                if isinstance(exc, StoreError):
                    self._failing(str(exc))
                else:
                    log.exception("[%s] Uploading spooled %s failed unexpectedly", image.request_id, image.name)
                    self._failing(failure_reason(exc))
                return False
            self._ok()
            self.spool.remove(path)
            self._count_spooled()
            with self._lock:
                self._stored_later[image.name] = location
                while len(self._stored_later) > STORED_LATER_MEMORY:
                    self._stored_later.popitem(last=False)
            log.info("[%s] Stored spooled image %s", image.request_id, image.name)
        return True

    # -- internals

    def _keep(self, image: ImageObject) -> PutResult:
        try:
            self.spool.keep(image, self.store.destination())
        except OSError as exc:
            # The caller still answers the image inline; a 500 here would lose it for sure.
            log.error("[%s] Could not spool %s to %s (%s): the image exists only in its response",
                      image.request_id, image.name, self.spool.root, exc)
        else:
            self._count_spooled()
            self._wake.set()
        return PutResult(location=self.store.location(image.name), stored=False)

    def _count_spooled(self) -> None:
        METRICS.spooled_images.set(len(self.spool))

    def _waiting(self) -> int:
        """Spooled files this store may upload (those held for another destination wait for their own)."""
        with self._lock:
            held = set(self._held)
        return sum(1 for path in self.spool.pending() if path not in held)

    def _failing(self, reason: str) -> None:
        if self.state != "failing":
            log.warning("Storing images fails (%s): new images are answered inline and kept in %s until it "
                        "works again", reason, self.spool.root)
        self.state, self.error = "failing", reason

    def _ok(self) -> None:
        if self.state == "failing":
            log.info("The image store works again; %d spooled image(s) to upload", self._waiting())
        self.state, self.error = "ok", None

    def _check(self) -> bool:
        try:
            self.store.check()
        except Exception as exc:  # noqa: BLE001 - a store's bug must not end the uploader
            self._failing(failure_reason(exc))
            return False
        self._ok()
        return True

    def _first_check(self) -> None:
        try:
            self.store.check()
        except Exception as exc:  # noqa: BLE001 - StoreError, or a store's bug: either way, keep serving
            # The one start-up line about a broken store: requests then keep images, without tracebacks.
            self.state, self.error = "failing", failure_reason(exc)
            log.error("The image store is unusable: %s. Images are answered inline and kept in %s until it "
                      "works; /health shows store.state and store.error", exc, self.spool.root)
        else:
            self.state = "ok"
            log.info("The image store answers: %s", self.store.describe())

    def _run(self) -> None:
        if self.spool.root.is_dir():
            self._count_spooled()
            self.spool.discard_partial_writes()
            if len(self.spool):
                log.info("%d image(s) left in the spool %s from before: uploading those meant for this store",
                         len(self.spool), self.spool.root)
        self._first_check()
        delay = self.retry_min_seconds
        while not self._stop.is_set():
            try:
                healthy = self._upload_round()
            except Exception:  # noqa: BLE001 - a bug here must be seen, and must not end the uploads for good
                log.exception("The spool's uploader failed; trying again in %.0f s", delay)
                healthy = False
            if not healthy:
                self._back.wait(delay)  # the backoff, cut short by `nudge` (or `stop`)
                self._back.clear()
                delay = min(delay * 2, self.retry_max_seconds)
                continue
            delay = self.retry_min_seconds
            if not self._waiting():
                self._wake.wait(self.retry_max_seconds)  # idle until an image is spooled
                self._wake.clear()
                self._stop.wait(self.retry_min_seconds)  # let a burst of failures settle before retrying

    def _upload_round(self) -> bool:
        if self._waiting():
            return self.upload_pending()
        if self.state == "failing":
            return self._check()
        return True
