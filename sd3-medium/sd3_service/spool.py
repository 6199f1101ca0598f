"""No image is lost: what the store could not take waits on local disk, and a background thread uploads it.

`Spool` is a folder outside the read-only artifact (`SPOOL_DIR`), one file per image, written
atomically and fsynced, so it survives a crash or restart. `SpoolingStore` wraps the real store: it
keeps failed images in the spool, uploads them later under the names already answered, deletes a
spooled file only after its upload succeeded, and, while the store is known to fail, answers at once
instead of spending every request's retry budget on a bucket that is down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from sd3_service.store import ImageObject, ImageStore, Location, StoreError

log = logging.getLogger("sd3.spool")

SUFFIX = ".spooled"
# Names the uploader stored, remembered so that a repeated request_id can say so; more than the
# engine's answer cache (1024 requests by default) holds images for.
STORED_LATER_MEMORY = 8192
_IMAGE_NAME = re.compile(r"(?P<request_id>[A-Za-z0-9_-]+?)(-\d+)?\.\w+")


def failure_reason(exc: BaseException) -> str:
    """What /health and the log say about a failed store call: a StoreError's own words, else the type too."""
    return str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"


def request_id_of(name: str) -> str:
    """The request id inside a server-made object name (`…/<request_id>-<index>.<ext>`)."""
    match = _IMAGE_NAME.fullmatch(name.rsplit("/", 1)[-1])
    return match["request_id"] if match else name


class SpoolCorrupt(Exception):
    """A spooled file cannot be read back (it is set aside, never deleted)."""


class Spool:
    """A folder of images waiting to be stored: `<sha256 of the name>.spooled` holds a JSON line, then the bytes."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def keep(self, image: ImageObject) -> Path:
        """Write the image durably; keeping the same name again replaces the earlier file."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / (hashlib.sha256(image.name.encode()).hexdigest() + SUFFIX)
        header = {"name": image.name, "content_type": image.content_type, "metadata": image.metadata,
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

    def load(self, path: Path) -> ImageObject:
        """The image a spooled file holds; `SpoolCorrupt` if it does not check out."""
        raw = path.read_bytes()
        line, _, data = raw.partition(b"\n")
        try:
            header = json.loads(line)
            intact = hashlib.sha256(data).hexdigest() == header["sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolCorrupt(f"{path}: unreadable header ({exc})") from None
        if not intact:
            raise SpoolCorrupt(f"{path}: the bytes do not match their sha256")
        return ImageObject(name=header["name"], data=data, content_type=header["content_type"],
                           metadata=header.get("metadata") or {})

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def set_aside(self, path: Path) -> Path:
        """Move an unreadable file out of the queue (kept for a human to look at)."""
        target = self.root / "corrupt" / path.name
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
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
    """An `ImageStore` around another one that keeps, and later uploads, what the other could not store.

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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stored_later: OrderedDict[str, Location] = OrderedDict()
        self._stored_later_lock = threading.Lock()

    # -- ImageStore

    def location(self, name: str) -> Location:
        return self.store.location(name)

    def put(self, image: ImageObject) -> Location:
        if self.state == "failing":
            # Known down: answer now; the uploader probes the store and takes over this image.
            raise StoreError(f"{self.error} (still failing; the spool uploads it once the store answers)")
        try:
            location = self.store.put(image)
        except Exception as exc:
            self._failing(failure_reason(exc))
            raise
        self._ok()
        return location

    def describe(self) -> dict:
        about = dict(self.store.describe())
        about.update(state=self.state, spooled=len(self.spool), spool_dir=str(self.spool.root))
        if self.error:
            about["error"] = self.error
        return about

    # -- the spool

    def keep(self, image: ImageObject) -> None:
        """Keep an image that could not be stored (the engine's `on_store_failure`); never raises."""
        try:
            self.spool.keep(image)
        except OSError as exc:
            # The caller still answers the image inline; a 500 here would lose it for sure.
            log.error("[%s] Could not spool %s to %s (%s): the image exists only in its response",
                      request_id_of(image.name), image.name, self.spool.root, exc)
            return
        self._wake.set()

    def stored_later(self, name: str) -> Location | None:
        """Where the uploader stored a spooled image, or None while it waits (or was stored before a restart)."""
        with self._stored_later_lock:
            return self._stored_later.get(name)

    def start(self) -> threading.Thread:
        """Check the store once (one clear log line if it is unusable), then upload spooled images in the background."""
        self._thread = threading.Thread(target=self._run, name="sd3-spool", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def upload_pending(self) -> bool:
        """Upload spooled images, oldest first, stopping at the first failure; True when all of them were stored."""
        for path in self.spool.pending():
            if self._stop.is_set():
                return False
            try:
                image = self.spool.load(path)
            except FileNotFoundError:
                continue  # another worker uploaded it meanwhile
            except SpoolCorrupt as exc:
                log.error("Setting aside an unreadable spooled file (%s): %s", exc, self.spool.set_aside(path))
                continue
            try:
                location = self.store.put(image)
            except StoreError as exc:
                self._failing(str(exc))
                return False
            except Exception as exc:  # noqa: BLE001 - the uploader must outlive a store's bug; the file stays
                log.exception("[%s] Uploading spooled %s failed unexpectedly", request_id_of(image.name), image.name)
                self._failing(failure_reason(exc))
                return False
            self._ok()
            self.spool.remove(path)
            with self._stored_later_lock:
                self._stored_later[image.name] = location
                while len(self._stored_later) > STORED_LATER_MEMORY:
                    self._stored_later.popitem(last=False)
            log.info("[%s] Stored spooled image %s", request_id_of(image.name), image.name)
        return True

    # -- internals

    def _failing(self, reason: str) -> None:
        if self.state != "failing":
            log.warning("Storing images fails (%s): new images are answered inline and kept in %s until it "
                        "works again", reason, self.spool.root)
        self.state, self.error = "failing", reason

    def _ok(self) -> None:
        if self.state == "failing":
            log.info("The image store works again; %d spooled image(s) to upload", len(self.spool))
        self.state, self.error = "ok", None

    def _check(self) -> bool:
        check = getattr(self.store, "check", None)
        if check is None:  # a store without a check (the local folder) is tried by the next put
            self._ok()
            return True
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - a store's bug must not end the uploader
            self._failing(failure_reason(exc))
            return False
        self._ok()
        return True

    def _run(self) -> None:
        if self.spool.root.is_dir():
            self.spool.discard_partial_writes()
            if len(self.spool):
                log.info("%d image(s) left in the spool %s from before: uploading them", len(self.spool),
                         self.spool.root)
        check = getattr(self.store, "check", None)
        if check is not None:
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - StoreError, or a store's bug: either way, keep serving
                # The one start-up line about a broken store: requests then fail fast, without tracebacks.
                self.state, self.error = "failing", failure_reason(exc)
                log.error("The image store is unusable: %s. Images are answered inline and kept in %s until it "
                          "works; /health shows store.state and store.error", exc, self.spool.root)
            else:
                self.state = "ok"
                log.info("The image store answers: %s", self.store.describe())
        delay = self.retry_min_seconds
        while not self._stop.is_set():
            if len(self.spool):
                healthy = self.upload_pending()
            elif self.state == "failing":
                healthy = self._check()
            else:
                healthy = True
            if not healthy:
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_max_seconds)
                continue
            delay = self.retry_min_seconds
            if not len(self.spool):
                self._wake.wait(self.retry_max_seconds)  # idle until an image is spooled
                self._wake.clear()
                self._stop.wait(self.retry_min_seconds)  # let a burst of failures settle before retrying
