"""The engine: one request from admission to answer, in six steps, whichever API surface it came through.

    1. admit     a place on the device pool (or 503 not ready, 429 queue full)
    2. inputs    LoRA adapters found, fetched and checked; starting images read, decoded, checked and sized;
                 before any device is touched
    3. generate  on the first free device
    4. keep      the input's own pixels outside an inpainting mask
    5. write     encode, name and store the images (or keep them in the spool)
    6. answer    recorded in the ledger, then given to every caller waiting for it

Around those steps the request's lifecycle (`jobs/lifecycle.py`) answers repeats of an id, claims it in
the ledger, follows another instance that owns it, and records how it ended. A caller waits up to
`SYNC_WAIT_SECONDS` (or not at all, with `wait: false`) and is then answered `Pending`; the work goes on
as its own task. Steps 2, 4 and 5 run on an I/O thread pool, so a device starts its next generation while
the previous request's images are still being encoded and stored; adapters are fetched on the LoRA
library's own threads, so a large download never holds a lease renewal or an upload. The engine knows no HTTP: each API
surface turns its `ImageRequest`s into answers in its own format.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sd3_service.errors import ServiceError, invalid_field, not_ready
from sd3_service.inputs import InputReader
from sd3_service.jobs.book import Job
from sd3_service.jobs.ledger import Record, recorded_parameters, seed_for
from sd3_service.jobs.lifecycle import Lifecycle, request_log
from sd3_service.lora_library import LoraLibrary
from sd3_service.metrics import METRICS
from sd3_service.pipelines.devices import DevicePool, Ticket
from sd3_service.pipelines.generation import keep_outside_mask
from sd3_service.spec import Answer, Finished, ImageRequest, KeepAlive, Pending, Previewed, Queued, Stepped
from sd3_service.storage.encoding import encode_image
from sd3_service.storage.store import ObjectRefused, StoreError
from sd3_service.storage.writer import ImageWriter
from sd3_service.webhooks import ATTEMPT_SECONDS, Delivery, Webhooks, adoptable, poll_answer_of_error

log = logging.getLogger("sd3.requests")


@dataclass(frozen=True)
class Health:
    """Where the service stands: `loading`, `ready` or `failed`, with what /health shows."""

    status: str
    details: dict


class Report:
    """What one request's finished log line and stage metrics say (never its prompt)."""

    def __init__(self, request: ImageRequest):
        self.mode = request.mode
        self.steps = request.num_inference_steps
        self.size = None if request.width is None else f"{request.width}x{request.height}"
        self.device: str | None = None
        self.stages: dict[str, float] = {}

    def sized(self, request: ImageRequest, inputs: float) -> None:
        self.size = f"{request.width}x{request.height}"
        self.stages["inputs"] = inputs

    def generated(self, generated) -> None:
        self.device = generated.device
        self.stages.update(queue=generated.queue_seconds, generate=generated.generate_seconds)

    def finished(self, request_id: str, status: str, exc: BaseException | None = None) -> None:
        """One line per finished request: JSON fields with `LOG_FORMAT=json`; stage metrics when it generated."""
        METRICS.stages(self.stages)
        stages_ms = {stage: round(seconds * 1000) for stage, seconds in self.stages.items()}
        fields = {"request_id": request_id, "mode": self.mode, "device": self.device, "steps": self.steps,
                  "size": self.size, "stages_ms": stages_ms, "status": status}
        if exc is not None:
            error = ServiceError.of(exc) if not isinstance(exc, asyncio.CancelledError) else None
            fields.update(code=error.code if error else "cancelled", http_status=error.status if error else None)
        timings = ", ".join(f"{stage} {ms} ms" for stage, ms in stages_ms.items())
        log.info("[%s] Finished: %s, %s, %s steps, %s on %s%s%s", request_id, status, self.mode, self.steps,
                 self.size or "size of its input", self.device or "no device",
                 f", {timings}" if timings else "", f", {fields['code']}" if exc is not None else "",
                 extra={"event": "request_finished", **fields})


class Engine:
    """Serves requests: each one's steps in order, on the device pool and the image writer.

    Args:
        pool: the devices that generate.
        writer: encodes and stores the images (and keeps what the store cannot take).
        lifecycle: the jobs this process holds and the ledger across instances.
        io: threads that read inputs, encode and store images (the ledger has threads of its own).
        inputs: reads and checks starting images (image to image, inpainting).
        loras: finds, fetches and checks the LoRA adapters requests name.
        sync_wait_seconds: how long a waiting caller waits before it is answered `Pending`.
        keep_text: the ledger may record the prompt's text (`STORE_PARAMS`), not only its sha256.
    """

    def __init__(self, pool: DevicePool, writer: ImageWriter, lifecycle: Lifecycle, io: ThreadPoolExecutor,
                 inputs: InputReader | None = None, loras: LoraLibrary | None = None, sync_wait_seconds: float = 50.0,
                 keep_text: bool = False, webhooks: Webhooks | None = None):
        self.pool = pool
        self.writer = writer
        self.lifecycle = lifecycle
        self.io = io
        self.inputs = inputs or InputReader()
        self.loras = loras
        self.sync_wait_seconds = sync_wait_seconds
        self.keep_text = keep_text
        self.webhooks = webhooks
        if webhooks is not None:
            webhooks.settled = lambda delivery, outcome: lifecycle.webhook_noted(delivery.request_id, delivery.id,
                                                                                 {"state": outcome})
            webhooks.renew = lambda delivery, until: lifecycle.webhook_noted(delivery.request_id, delivery.id,
                                                                             {"held_until": until})
            lifecycle.on_finished_record = self._adopt_webhooks

    def start(self) -> None:
        """Start loading the model and uploading what an earlier run kept."""
        METRICS.start()
        self.writer.start()
        self.pool.start()
        if self.webhooks is not None:
            self.webhooks.start()

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
        details["jobs"] = len(self.lifecycle.active())
        if self.loras is not None:
            details["loras"] = {"catalog": self.loras.describe(), "loaded": self.pool.loaded_loras(),
                                "fused": [adapter.describe() for adapter in self.pool.fused_loras()]}
        return Health(status=status, details=details)

    def model_name(self) -> str | None:
        """The name of the model the devices serve, once one is placed."""
        model = self.pool.model()
        return None if model is None else model[0]

    def model_id(self) -> str | None:
        """The served model's id for clients (see `ModelSource.id`), once one is placed."""
        source = self.pool.source()
        return None if source is None else source.id

    # -- requests -----------------------------------------------------------------------------------

    async def run(self, request: ImageRequest, wait_to_end: bool = False) -> Finished | Pending:
        """Answer a request: its images (for a repeated id, the first answer), or `Pending` when it asked not to
        wait or is not done within `SYNC_WAIT_SECONDS` (unless `wait_to_end`). Raises `ServiceError`."""
        started = await self.accept(request)
        if isinstance(started, Finished):
            return started
        return await self._outcome(started, request.wait, None if wait_to_end else self.sync_wait_seconds)

    async def accept(self, request: ImageRequest) -> Finished | Job:
        """Accept a request: the first answer for an id answered before, else its job (this process's, or a new one,
        admitted and started). Raises `ServiceError` when it cannot be accepted."""
        request_id = request.request_id or uuid.uuid4().hex
        if request.webhook is not None:  # refused before any work
            if self.webhooks is None:
                raise invalid_field("webhook", "this deployment sends no webhooks: set WEBHOOK_SECRET (or "
                                               "WEBHOOK_SECRET_OCID) and WEBHOOK_HOSTS to allow them")
            await self.webhooks.check(request.webhook)
        parameters = recorded_parameters(request, self.keep_text, self._fused())
        if request.request_id is not None:  # a repeat answered before (elsewhere, or before a restart)?
            recorded = await self.lifecycle.answered_before(request_id, parameters,
                                                            fused_known=self.pool.model() is not None)
            if recorded is not None:
                return Finished(self.writer.as_stored_since(recorded))
        # Held here? Checked after the read, with nothing awaited from here to `open`: one job per id.
        job = self.lifecycle.held(request_id, parameters)
        if job is not None:
            request_log(request_id).info("Repeated request_id: answering from this process")
            return job
        if not self.pool.ready_count():
            raise not_ready(self.pool.error())
        if request.loras:
            self._check_takes_adapters()
        self.lifecycle.check_room(self.pool.retry_after())
        # 1. admit: a caller that waits may wait behind MAX_QUEUE requests; one that polls, behind MAX_JOBS
        ticket = self.pool.admit(request_id, None if request.wait else self.lifecycle.max_jobs, request)
        job = Job(request_id=request_id, request=request, parameters=parameters, seed=seed_for(request, request_id),
                  day=dt.datetime.now(dt.timezone.utc).strftime("%Y/%m/%d"))
        if request.webhook is not None and "start" in request.webhook_events:
            self._on_start(job, request.webhook)
        self.lifecycle.open(job, self._serve(job, ticket))
        return job

    def _on_start(self, job: Job, url: str) -> None:
        """Send `image.started` once its generation starts (told from the device's thread)."""
        loop = asyncio.get_running_loop()

        def started(event: tuple) -> None:
            if event[0] == "started":
                job.listeners.remove(started)
                loop.call_soon_threadsafe(self._send_started, job, url)

        job.listeners.append(started)

    def _send_started(self, job: Job, url: str) -> None:
        progress = job.progress
        data = {"request_id": job.request_id, "status": "running", "position": None,
                "progress": None if progress is None else {"step": progress[0], "steps": progress[1]},
                "retry_after": self._retry_after(job.request, progress)}
        delivery = self.webhooks.event(job.request_id, url, "image.started", data)
        self.webhooks.keep(delivery)
        self.webhooks.send(delivery)

    def _adopt_webhooks(self, record: Record) -> None:
        """Send the webhook events of a finished record that no live sender holds (its instance died), with the same
        `webhook-id`; claimed in the record first, so that one reader adopts each."""
        if self.webhooks is None:
            return
        now = time.time()
        for event in adoptable(record, now):
            if event["id"] not in self.webhooks.sending:
                asyncio.get_running_loop().create_task(self._adopt(record, event, now))

    async def _adopt(self, record: Record, event: dict, now: float) -> None:
        held = now + ATTEMPT_SECONDS + self.webhooks.hold_slack
        try:
            claimed = await self._in_io(self.lifecycle.webhook_noted, record.request_id, event["id"],
                                        {"held_until": held}, now)
        except StoreError:
            return  # the next reader tries again
        if claimed is None:
            return  # someone else holds it now, or it ended
        data = record.answer if record.state == "done" else {"error": {
            key: (record.error or {}).get(key) for key in ("code", "message", "field")}}
        sent = dt.datetime.fromisoformat(event["timestamp"])
        delivery = Delivery(id=event["id"], request_id=record.request_id, url=record.parameters["webhook"],
                            type=event["type"], timestamp=event["timestamp"], data=data,
                            deadline=sent.timestamp() + self.webhooks.retry_seconds)
        request_log(record.request_id).info("Adopting its webhook event %s (%s): its sender is gone", delivery.id,
                                            delivery.type)
        self.webhooks.keep(delivery)
        self.webhooks.send(delivery)

    def _noted(self, delivery: Delivery | None) -> list | None:
        """What a request's record keeps of its webhook event: enough for another instance to send it, once no live
        sender holds it (`held_until`, renewed before each wait between attempts)."""
        if delivery is None:
            return None
        return [{"id": delivery.id, "type": delivery.type, "timestamp": delivery.timestamp, "state": "pending",
                 "held_until": time.time() + ATTEMPT_SECONDS + self.webhooks.hold_slack}]

    def _completion(self, job: Job, kind: str, data: dict):
        """The completion event of a job with a webhook, kept on disk (sent once its record says how it ended)."""
        url = job.parameters.get("webhook")
        if url is None or self.webhooks is None or "completed" not in job.parameters.get("webhook_events_filter", ()):
            return None
        delivery = self.webhooks.event(job.request_id, url, kind, data)
        self.webhooks.keep(delivery)
        return delivery

    async def prepared(self, started: Finished | Job) -> None:
        """Wait until a request's inputs and adapters are read and checked, so that a stream opens only for a request
        that passed them (one refused for them gets a plain error answer). Raises the `ServiceError` it failed with."""
        if isinstance(started, Finished) or not started.active or started.prepared.is_set():
            return
        prepared, work = asyncio.ensure_future(started.prepared.wait()), started.work
        try:
            await asyncio.wait({prepared, work}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            prepared.cancel()
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()

    async def follow(self, started: Finished | Job, keepalive_seconds: float) -> AsyncIterator[
            Queued | Stepped | Previewed | KeepAlive | Finished]:
        """What a streamed request shows as it goes: `Queued` while it waits, each `Stepped` and `Previewed`, a
        `KeepAlive` after `keepalive_seconds` without news, and last its `Finished` answer (or the `ServiceError`
        it failed with, raised). A job held by another instance shows no steps, only its answer."""
        if isinstance(started, Finished):
            yield started
            return
        job, loop, news = started, asyncio.get_running_loop(), asyncio.Queue()
        listener = lambda event: loop.call_soon_threadsafe(news.put_nowait, event)  # noqa: E731 - any thread
        job.listeners.append(listener)
        heard = None
        try:
            output_format = job.request.output_format if job.request is not None else "png"
            quality = job.request.output_quality if job.request is not None else None
            if job.active and job.state == "queued":
                yield Queued(job.request_id, self.pool.position(job.request_id))
            while job.active:
                heard = asyncio.ensure_future(news.get())
                await asyncio.wait({heard, job.work}, timeout=keepalive_seconds, return_when=asyncio.FIRST_COMPLETED)
                if not heard.done():
                    heard.cancel()
                    if job.active:  # a new place in the queue, or just word that it is still there
                        place = self.pool.position(job.request_id) if job.state == "queued" else None
                        yield Queued(job.request_id, place) if place is not None else KeepAlive()
                    continue
                if heard.result()[0] != "started":
                    yield await self._news(job.request_id, heard.result(), output_format, quality)
            while not news.empty():  # what came in just before the end
                if (event := news.get_nowait())[0] != "started":
                    yield await self._news(job.request_id, event, output_format, quality)
            yield await self._outcome(job, wait=True, sync_wait=None)
        finally:  # also when the caller went away: the job goes on
            job.listeners.remove(listener)
            if heard is not None:
                heard.cancel()

    async def _news(self, request_id: str, event: tuple, output_format: str, quality: int | None):
        if event[0] == "step":
            return Stepped(request_id, *event[1:])
        index, step, steps, images = event[1:]
        files = await self._in_io(lambda: [encode_image(image, output_format, quality) for image in images])
        return Previewed(request_id, index, step, steps, files)

    async def poll(self, request_id: str) -> Finished | Pending:
        """The answer to an earlier request, or where it stands; `ServiceError` when there is none."""
        found = await self.lifecycle.lookup(request_id)
        if isinstance(found, Job):
            return await self._outcome(found, wait=False, sync_wait=0)
        if isinstance(found, Answer):
            return Finished(found)
        return self._pending_from_record(found)

    async def image_bytes(self, finished: Finished) -> list[bytes]:
        """The files of a finished request: as just encoded, or read back (a repeat's answer carries none); 503 while
        the store cannot be read, 410 for an image no longer there."""
        if finished.files:
            return [file.data for file in finished.files]
        request_id = finished.answer.request_id
        files = []
        for image in finished.answer.images:
            try:
                files.append(await self._in_io(self.writer.read, image))
            except (ObjectRefused, StoreError) as exc:
                if isinstance(exc, ObjectRefused) and exc.status == 404:
                    raise ServiceError(410, "image_gone", f"image {image.object_name} of request '{request_id}' is "
                                                          "no longer in the store (a lifecycle rule may have removed "
                                                          "it); send the request with a new request_id to make it "
                                                          "again") from None
                raise ServiceError(503, "store_unavailable", f"cannot read image {image.object_name} of request "
                                                             f"'{request_id}' back now: {exc}", retry_after=10) from None
        return files

    # -- the work of one request, as its own task ------------------------------------------------------

    async def _serve(self, job: Job, ticket: Ticket) -> Finished:
        report = Report(job.request)
        try:
            elsewhere = await self.lifecycle.claim(job)
            if elsewhere is not None:  # another process owns the id: follow its record
                job.prepared.set()
                ticket.release()
                followed = await self.lifecycle.follow(job, *elsewhere)
                if isinstance(followed, Answer):
                    report.finished(job.request_id, "answered from its record")
                    return Finished(followed)
                # taken over: generated here, with the recorded seed and day (the same images, the same names)
                job.seed, job.day, job.state = followed.seed, followed.day, "queued"
                ticket = self.pool.admit(job.request_id, self.lifecycle.max_jobs, job.request)
            return await self._generate(job, ticket, report)
        except BaseException as exc:
            report.finished(job.request_id, "failed", exc)
            delivery = None
            # Only the request's owner tells its webhook (a follower's failure is not the request's outcome); not
            # when stopping: another instance takes it over
            owned = self.lifecycle.ledger is None or job.record is not None or job.unclaimed
            if owned and not isinstance(exc, asyncio.CancelledError):
                delivery = self._completion(job, "image.failed", poll_answer_of_error(exc))
            await self.lifecycle.failed(job, exc, self._noted(delivery))
            if delivery is not None:
                self.webhooks.send(delivery)
            raise
        finally:
            ticket.release()
            if self.loras is not None:
                self.loras.release(job.adapters)  # no longer kept from the cache's eviction for this job

    async def _generate(self, job: Job, ticket: Ticket, report: Report) -> Finished:
        # 2. inputs: here, inside the job, so a repeat of this id waits for it rather than downloading or decoding again
        request = job.request
        began = time.perf_counter()
        job.adapters = await self._adapters(request)
        if request.image is None:
            request, inputs = self.inputs.prepare(request)
        else:
            request, inputs = await self._in_io(self.inputs.prepare, request)
        report.sized(request, inputs=time.perf_counter() - began)
        job.prepared.set()
        # 3. generate
        generated = await self.pool.generate(ticket, request, job.seed, inputs, watcher=job, adapters=job.adapters)
        report.generated(generated)
        images = generated.images
        # 4. keep what is outside the mask (here rather than on the device's thread, which takes its next request)
        if inputs.mask is not None:
            images = await self._in_io(keep_outside_mask, images, inputs)
        # 5. write
        written = await self._in_io(self.writer.write, request, job.request_id, job.seed, images,
                                    self.model_name() or "", inputs, dt.datetime.strptime(job.day, "%Y/%m/%d"),
                                    self._fused() + [adapter.describe() for adapter in job.adapters])
        # 6. answer: recorded before any caller gets it
        answer = Answer(request_id=job.request_id, seed=job.seed, images=written.images, timings_ms={
            "queue": round(generated.queue_seconds * 1000),
            "generate": round(generated.generate_seconds * 1000),
            "encode": round(written.encode_seconds * 1000),
            "store": round(written.store_seconds * 1000),
        })
        delivery = self._completion(job, "image.completed", answer.without_data().model_dump(mode="json"))
        await self.lifecycle.done(job, answer, self._noted(delivery))
        if delivery is not None:
            self.webhooks.send(delivery)
        report.stages.update(encode=written.encode_seconds, store=written.store_seconds)
        report.finished(job.request_id, "done")
        return Finished(answer, written.files)

    # -- answers ------------------------------------------------------------------------------------

    async def _outcome(self, job: Job, wait: bool, sync_wait: float | None) -> Finished | Pending:
        if job.answer is not None:  # done: images the spool has stored since are answered as stored
            answer = self.writer.as_stored_since(job.answer)
            if not all(image.stored for image in answer.images):  # the others inline, as the first caller had them
                answer = await self._in_io(self.writer.with_spooled_data, answer)
            return Finished(answer)
        if job.work.done() or wait:
            try:
                result = await asyncio.wait_for(asyncio.shield(job.work), None if job.work.done() else sync_wait)
            except TimeoutError:
                return self._pending(job)
            return Finished(self.writer.as_stored_since(result.answer), result.files)
        return self._pending(job)

    def _pending(self, job: Job) -> Pending:
        # Past "queued" it is running until its work ends: generating, then storing and recording its answer (its
        # state says "done" or "failed" a moment before the work ends and the answer is held).
        running = job.state != "queued"
        progress = job.progress if running else None
        return Pending(request_id=job.request_id, status="running" if running else "queued",
                       position=None if running else self.pool.position(job.request_id), progress=progress,
                       retry_after=self._retry_after(job.request, progress))

    def _pending_from_record(self, record: Record) -> Pending:
        return Pending(request_id=record.request_id, status=record.state, position=None, progress=None,
                       retry_after=self.pool.retry_after())

    def _retry_after(self, request: ImageRequest | None, progress: tuple[int, int] | None) -> int:
        """About when it may be done: the rest of its generation (by its steps and pixels), at least a second."""
        seconds = self.pool.seconds_for(request)
        if progress is not None:
            seconds *= 1 - progress[0] / max(1, progress[1])
        return max(1, math.ceil(seconds))

    def _check_takes_adapters(self) -> None:
        if self.loras is None or self.pool.lora_modules() is None:
            raise invalid_field("loras", "this deployment takes no LoRA adapters (SD3_FUSE_QKV=true fuses the "
                                         "layers they adapt)")

    async def _adapters(self, request: ImageRequest) -> list:
        """The request's LoRA adapters, found, fetched and checked (before any device is touched)."""
        if not request.loras:
            return []
        self._check_takes_adapters()
        return await self.loras.fetch(request.loras)

    def _fused(self) -> list[dict]:
        """What records, metadata and sidecars keep of the adapters `LORA_FUSE` fused into the weights."""
        return [{**adapter.describe(), "fused": True} for adapter in self.pool.fused_loras()]

    async def _in_io(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.io, function, *args)

    def shutdown(self) -> None:
        self.lifecycle.stop()
        self.pool.shutdown()
        if self.loras is not None:
            self.loras.shutdown()
        self.io.shutdown(wait=True)
        self.writer.stop()
