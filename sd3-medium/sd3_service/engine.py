"""The generation engine: one pipeline, one GPU thread, a bounded queue, idempotent answers.

Generations run one at a time on a single dedicated thread (the pipeline is not thread-safe and a
GPU runs one at a time best). Encoding and storing run on a separate pool, so the next generation
starts while the previous request's images are still being encoded and stored.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from sd3_service.generation import EncodedImage, encode_image, generate_images
from sd3_service.model_loading import LoadedPipeline
from sd3_service.contract import MAX_SEED, PredictRequest, PredictResponse, StoredImage
from sd3_service.store import ImageObject, ImageStore, Location, StoreError, object_name

log = logging.getLogger("sd3.engine")

WARMUP_REQUEST = PredictRequest(prompt="warm-up", num_inference_steps=2, guidance_scale=7.0)


class NotReady(Exception):
    """The pipeline is still loading, or failed to load."""


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the generation queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Generation:
    """A finished request: the JSON answer plus the encoded bytes (for /txt2img)."""

    response: PredictResponse
    files: list[EncodedImage]


class RequestLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['request_id']}] {msg}", kwargs


class Engine:
    """Owns the pipeline and runs requests against it.

    Args:
        load: builds the pipeline (called once, on a background thread).
        store: where images go.
        object_prefix: prefix of every object name.
        max_queue: requests allowed to wait beyond the one generating.
        cache_size: finished answers remembered by request_id.
        io_threads: threads that encode and store images.
        on_store_failure: called with an image that could not be stored, so it is kept for later.
        stored_later: where such an image went once it was stored after all (None while it waits), so that
            a repeated request_id answers it as stored.
        store_params: also store `<request_id>.json` next to the images, with every parameter (prompt too).
    """

    def __init__(
        self,
        load: Callable[[], LoadedPipeline],
        store: ImageStore,
        object_prefix: str = "sd3/",
        max_queue: int = 4,
        cache_size: int = 1024,
        io_threads: int = 4,
        on_store_failure: Callable[[ImageObject], None] | None = None,
        stored_later: Callable[[str], Location | None] | None = None,
        store_params: bool = False,
    ):
        self._load = load
        self.store = store
        self.object_prefix = object_prefix
        self.max_queue = max_queue
        self.cache_size = cache_size
        self.on_store_failure = on_store_failure
        self.stored_later = stored_later
        self.store_params = store_params
        self.status = "loading"
        self.error: str | None = None
        self.loaded: LoadedPipeline | None = None
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd3-gpu")
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="sd3-io")
        self._admitted = 0  # requests admitted and not yet done generating
        self._running: set[asyncio.Future] = set()  # strong references: the loop keeps only weak ones
        self._answers: OrderedDict[str, asyncio.Future] = OrderedDict()
        self._seconds_per_generation = 1.0  # running estimate, for Retry-After

    # -- start-up -----------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Load and warm up the pipeline in the background; /health reports progress meanwhile."""
        thread = threading.Thread(target=self._load_and_warm_up, name="sd3-load", daemon=True)
        thread.start()
        return thread

    def _load_and_warm_up(self) -> None:
        started = time.perf_counter()
        try:
            loaded = self._gpu.submit(self._load).result()
            warm_up = time.perf_counter()
            self._gpu.submit(generate_images, loaded.pipe, WARMUP_REQUEST, 0, loaded.device).result()
            self._seconds_per_generation = time.perf_counter() - warm_up
        except BaseException as exc:  # noqa: BLE001 - any failure must reach /health, not kill the thread silently
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = "failed"
            log.exception("Loading the model failed; /health answers 503 failed")
            return
        self.loaded = loaded
        self.status = "ready"
        log.info("Model %s ready on %s (%s) in %.1f s", loaded.source.name, loaded.device, loaded.dtype,
                 time.perf_counter() - started)

    def health(self) -> tuple[int, dict]:
        if self.status == "ready":
            assert self.loaded is not None
            return 200, {"status": "ready", "model": self.loaded.source.name, "device": self.loaded.device,
                         "dtype": self.loaded.dtype, "store": self.store.describe()}
        if self.status == "failed":
            return 503, {"status": "failed", "error": self.error}
        return 503, {"status": "loading"}

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the running generation ends within one generation time."""
        return max(1, math.ceil(self._seconds_per_generation))

    # -- requests ---------------------------------------------------------------------------------

    async def run(self, request: PredictRequest) -> Generation:
        """Generate, encode and store; a request_id seen before returns its first answer."""
        if self.status != "ready":
            raise NotReady(self.error or "the model is still loading")
        request_id = request.request_id or uuid.uuid4().hex
        earlier = self._answers.get(request_id)
        if earlier is not None:
            RequestLog(log, {"request_id": request_id}).info("Repeated request_id: returning the first answer")
            return Generation(response=self._with_later_stores(await asyncio.shield(earlier)), files=[])
        if self._admitted > self.max_queue:
            raise QueueFull(self.retry_after())

        answer = asyncio.get_running_loop().create_future()
        self._remember(request_id, answer)
        self._admitted += 1  # counted now: a second request in this same loop turn must see it
        # The work runs as its own task: a caller that goes away (a client or load-balancer timeout)
        # does not cancel it, so the images are still stored and a retry with this id gets the answer.
        work = asyncio.ensure_future(self._generate(request, request_id))
        self._running.add(work)
        work.add_done_callback(functools.partial(self._settle, request_id, answer))
        return await asyncio.shield(work)

    def _settle(self, request_id: str, answer: asyncio.Future, work: asyncio.Future) -> None:
        """Record a finished request's answer for repeats, or forget a failed one so it may be sent again."""
        self._running.discard(work)
        if not work.cancelled() and work.exception() is None:
            answer.set_result(work.result().response)
            return
        self._answers.pop(request_id, None)
        answer.set_exception(NotReady("the server stopped") if work.cancelled() else work.exception())
        answer.exception()  # mark retrieved: the first caller gets the exception from the task itself

    def _with_later_stores(self, response: PredictResponse) -> PredictResponse:
        """The first answer, with the images stored since it was given marked stored (and no inline copy)."""
        if self.stored_later is None or all(image.stored for image in response.images):
            return response
        images = []
        for image in response.images:
            where = None if image.stored else self.stored_later(image.object_name)
            images.append(image if where is None else image.model_copy(
                update={"stored": True, "data": None, "uri": where.uri, "url": where.url}))
        return response.model_copy(update={"images": images})

    def _remember(self, request_id: str, answer: asyncio.Future) -> None:
        self._answers[request_id] = answer
        while len(self._answers) > self.cache_size:
            oldest_id, oldest = next(iter(self._answers.items()))
            if not oldest.done():
                break
            del self._answers[oldest_id]

    async def _generate(self, request: PredictRequest, request_id: str) -> Generation:
        rlog = RequestLog(log, {"request_id": request_id})
        loaded = self.loaded
        assert loaded is not None
        loop = asyncio.get_running_loop()
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        admitted = time.perf_counter()
        started: list[float] = []

        def on_gpu():
            started.append(time.perf_counter())
            return generate_images(loaded.pipe, request, seed, loaded.device)

        try:
            images = await loop.run_in_executor(self._gpu, on_gpu)
        finally:
            self._admitted -= 1  # counted by run()
        generated = time.perf_counter()
        generate_s = generated - started[0]
        self._seconds_per_generation = 0.8 * self._seconds_per_generation + 0.2 * generate_s
        rlog.info("Generated %d image(s) %dx%d, %d steps, seed %d in %.0f ms", len(images), request.width,
                  request.height, request.num_inference_steps, seed, generate_s * 1000)

        files, stored, encode_s, store_s = await loop.run_in_executor(
            self._io, self._encode_and_store, request, request_id, seed, images, rlog)
        response = PredictResponse(
            request_id=request_id,
            seed=seed,
            images=stored,
            timings_ms={
                "queue": round((started[0] - admitted) * 1000),
                "generate": round(generate_s * 1000),
                "encode": round(encode_s * 1000),
                "store": round(store_s * 1000),
            },
        )
        return Generation(response=response, files=files)

    def _encode_and_store(self, request, request_id, seed, images, rlog):
        began = time.perf_counter()
        files = [encode_image(image, request.output_format) for image in images]
        encoded = time.perf_counter()
        now = dt.datetime.now(dt.timezone.utc)
        metadata = self.metadata(request, seed)
        stored = []
        for index, file in enumerate(files):
            image = ImageObject(
                name=object_name(self.object_prefix, request_id, index, file.extension, now),
                data=file.data, content_type=file.content_type, metadata=metadata,
            )
            stored.append(self._store_one(image, file, rlog))
        if self.store_params:
            self._store_sidecar(request, request_id, seed, stored, metadata, now, rlog)
        return files, stored, encoded - began, time.perf_counter() - encoded

    def _store_sidecar(self, request, request_id, seed, stored, metadata, now, rlog) -> None:
        """Store `<request_id>.json`: the body that reproduces these images, and what they are."""
        assert self.loaded is not None
        record = {
            "request_id": request_id,
            "created": now.isoformat(),
            "model": self.loaded.source.name,
            # Sent back to /predict as the body, this makes the same images (same hardware and software).
            "parameters": request.model_dump(mode="json", exclude={"request_id"}) | {"seed": seed},
            "images": [{"object_name": s.object_name, "sha256": s.sha256, "bytes": s.bytes} for s in stored],
        }
        sidecar = ImageObject(name=f"{self.object_prefix}{now:%Y/%m/%d}/{request_id}.json",
                              data=json.dumps(record, indent=1).encode(), content_type="application/json",
                              metadata=metadata)
        try:
            self.store.put(sidecar)
        except Exception as exc:  # noqa: BLE001 - as for the images: kept, never lost
            rlog.warning("Storing %s failed (%s): keeping it for a later retry", sidecar.name, exc,
                         exc_info=not isinstance(exc, StoreError))  # a store's bug gets its traceback
            if self.on_store_failure is not None:
                self.on_store_failure(sidecar)

    def metadata(self, request: PredictRequest, seed: int) -> dict[str, str]:
        """Generation parameters stored with each image (never the prompt text itself)."""
        assert self.loaded is not None
        return {
            "seed": str(seed),
            "steps": str(request.num_inference_steps),
            "guidance": str(request.guidance_scale),
            "width": str(request.width),
            "height": str(request.height),
            "model": self.loaded.source.name,
            "prompt-sha256": hashlib.sha256(request.prompt.encode()).hexdigest(),
        }

    def _store_one(self, image: ImageObject, file: EncodedImage, rlog) -> StoredImage:
        try:
            where = self.store.put(image)
            stored = True
        except Exception as exc:  # noqa: BLE001 - whatever broke, the image is answered and kept, never lost
            if isinstance(exc, StoreError):
                rlog.warning("Storing %s failed (%s): returning it inline and keeping it for a later retry",
                             image.name, exc)
            else:  # a bug in a store, or an SDK error it did not expect: worth its traceback
                rlog.exception("Storing %s failed unexpectedly: returning it inline and keeping it for a later "
                               "retry", image.name)
            if self.on_store_failure is not None:
                self.on_store_failure(image)
            where = self.store.location(image.name)
            stored = False
        return StoredImage(
            uri=where.uri, object_name=image.name, bucket=where.bucket, namespace=where.namespace,
            content_type=file.content_type, bytes=len(file.data), sha256=file.sha256,
            width=file.width, height=file.height, stored=stored, url=where.url,
            data=None if stored else base64.b64encode(file.data).decode("ascii"),
        )

    def shutdown(self) -> None:
        self._gpu.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=True)
