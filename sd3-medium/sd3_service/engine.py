"""The engine: a request from admission to answer, across the device pool, the answer book and the image writer.

Generations run on the device pool; encoding and storing run on a separate thread pool, so a device
starts its next generation while the previous request's images are still being encoded and stored.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sd3_service.answers import AnswerBook
from sd3_service.contract import MAX_SEED, PredictRequest, PredictResponse
from sd3_service.device_pool import DevicePool, NotReady
from sd3_service.generation import EncodedImage
from sd3_service.image_writer import ImageWriter
from sd3_service.inputs import NO_INPUTS, InputReader

log = logging.getLogger("sd3.engine")


@dataclass
class Generation:
    """A finished request: the JSON answer plus the encoded bytes (for /txt2img; empty for a repeat)."""

    response: PredictResponse
    files: list[EncodedImage]


@dataclass(frozen=True)
class Health:
    """Where the service stands: `loading`, `ready` or `failed`, with what /health shows."""

    status: str
    details: dict


class RequestLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['request_id']}] {msg}", kwargs


class Engine:
    """Serves requests: answers repeats from the book, admits to the pool, writes the images.

    Args:
        pool: the devices that generate.
        writer: encodes and stores the images.
        answers: answers by request id.
        inputs: reads and checks starting images (image to image, inpainting).
        io_threads: threads that read inputs, and encode and store images.
    """

    def __init__(self, pool: DevicePool, writer: ImageWriter, answers: AnswerBook,
                 inputs: InputReader | None = None, io_threads: int = 4):
        self.pool = pool
        self.writer = writer
        self.answers = answers
        self.inputs = inputs or InputReader()
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="sd3-io")
        self._running: set[asyncio.Future] = set()  # strong references: the loop keeps only weak ones

    def start(self) -> None:
        """Start loading the model and uploading what an earlier run kept."""
        self.writer.start()
        self.pool.start()

    def health(self) -> Health:
        status = self.pool.status()
        details: dict = {"status": status}
        model = self.pool.model()
        if status == "ready" and model is not None:
            ready = [device.name for device in self.pool.devices if device.state == "ready"]
            details.update(model=model[0], device=ready[0], dtype=model[1])
        if status == "failed":
            details["error"] = self.pool.error()
        details["devices"] = [device.describe() for device in self.pool.devices]
        details["store"] = self.writer.describe()
        return Health(status=status, details=details)

    async def run(self, request: PredictRequest) -> Generation:
        """Generate, encode and store; a request_id seen before returns its first answer."""
        if not self.pool.ready_count():
            raise NotReady(self.pool.error())
        request_id = request.request_id or uuid.uuid4().hex
        earlier = self.answers.earlier(request_id)
        if earlier is not None:
            RequestLog(log, {"request_id": request_id}).info("Repeated request_id: returning the first answer")
            return Generation(response=self.writer.as_stored_since(await asyncio.shield(earlier)), files=[])
        self.pool.admit()  # counted now: a second request in this same loop turn must see it
        # The work runs as its own task: a caller that goes away (a client or load-balancer timeout)
        # does not cancel it, so the images are still stored and a retry with this id gets the answer.
        work = asyncio.ensure_future(self._serve(request, request_id))
        self._running.add(work)
        work.add_done_callback(self._running.discard)
        self.answers.track(request_id, work)
        return await asyncio.shield(work)

    async def _serve(self, request: PredictRequest, request_id: str) -> Generation:
        loop = asyncio.get_running_loop()
        inputs = NO_INPUTS
        if request.image is not None:
            try:  # here, inside the tracked work: a repeat of this id waits for it rather than decoding again
                request, inputs = await loop.run_in_executor(self._io, self.inputs.prepare, request)
            except BaseException:
                self.pool.withdraw()
                raise
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        generated = await self.pool.generate(request, request_id, seed, inputs)
        model = self.pool.model()
        written = await loop.run_in_executor(
            self._io, self.writer.write, request, request_id, seed, generated.images, model[0] if model else "",
            inputs)
        response = PredictResponse(
            request_id=request_id,
            seed=seed,
            images=written.images,
            timings_ms={
                "queue": round(generated.queue_seconds * 1000),
                "generate": round(generated.generate_seconds * 1000),
                "encode": round(written.encode_seconds * 1000),
                "store": round(written.store_seconds * 1000),
            },
        )
        return Generation(response=response, files=written.files)

    def shutdown(self) -> None:
        self.pool.shutdown()
        self._io.shutdown(wait=True)
        self.writer.stop()
