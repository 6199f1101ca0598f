"""The engine: a request from admission to answer, across the jobs, the ledger, the device pool and the writer.

Every request is a job with an id. This process answers a repeated id from the jobs it holds; else the
ledger (a record per id in the store) says whether another process, instance or an earlier run owns
it: its answer when done, its state while it runs, a takeover when its owner died. A request is
answered 202 (its status) when it asked not to wait (`wait: false`) or is not done within
`SYNC_WAIT_SECONDS`; it goes on, and is polled with its id alone. Generations run on the device pool;
encoding and storing run on a separate thread pool, so a device starts its next generation while the
previous request's images are still being encoded and stored.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from sd3_service.contract import PendingResponse, PredictRequest, PredictResponse, Progress
from sd3_service.device_pool import DevicePool, NotReady, QueueFull
from sd3_service.generation import EncodedImage, keep_outside_mask
from sd3_service.image_writer import ImageWriter
from sd3_service.inputs import NO_INPUTS, InputError, InputReader
from sd3_service.jobs import Job, JobBook
from sd3_service.ledger import Ledger, Record, differing_fields, recorded_parameters, seed_for
from sd3_service.store import ImageObject, StoreError

log = logging.getLogger("sd3.engine")

LEDGER_PAUSE_SECONDS = 10.0  # after a failed claim, requests skip the ledger this long (each claim may retry ~6 s)


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


class RequestProblem(Exception):
    """A request answered with an error of the contract (status, code, message, field)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.field, self.retry_after = status, code, field, retry_after


class RequestLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['request_id']}] {msg}", kwargs


def _log(request_id: str) -> RequestLog:
    return RequestLog(log, {"request_id": request_id})


class Engine:
    """Serves requests: repeats from the jobs or the ledger, new ones on the pool, images through the writer.

    Args:
        pool: the devices that generate.
        writer: encodes and stores the images (and keeps what the store cannot take).
        jobs: the requests this process holds and its latest answers.
        ledger: the request records in the store; None serves from this process's memory only.
        inputs: reads and checks starting images (image to image, inpainting).
        sync_wait_seconds: how long a waiting caller waits before it is answered 202.
        max_jobs: requests this process holds (queued or running) before it answers 429.
        keep_text: the ledger may record the prompt's text (`STORE_PARAMS`), not only its sha256.
        io_threads: threads that read inputs, encode and store images, and call the ledger.
    """

    def __init__(self, pool: DevicePool, writer: ImageWriter, jobs: JobBook, ledger: Ledger | None = None,
                 inputs: InputReader | None = None, sync_wait_seconds: float = 50.0, max_jobs: int = 64,
                 keep_text: bool = False, io_threads: int = 4):
        self.pool = pool
        self.writer = writer
        self.jobs = jobs
        self.ledger = ledger
        self.inputs = inputs or InputReader()
        self.sync_wait_seconds = sync_wait_seconds
        self.max_jobs = max_jobs
        self.keep_text = keep_text
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="sd3-io")
        self._renewing: asyncio.Task | None = None
        self._ledger_down_until = 0.0  # after a failed claim, skip the ledger for a while: no request waits on it

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
        details["jobs"] = len(self.jobs.active())
        return Health(status=status, details=details)

    # -- requests -----------------------------------------------------------------------------------

    async def run(self, request: PredictRequest, wait_to_end: bool = False) -> Generation | PendingResponse:
        """Answer a request: its images (a repeated id: the first answer), or its status (202) when it asked not
        to wait, or is not done within `SYNC_WAIT_SECONDS` (unless `wait_to_end`: the image routes)."""
        self._start_renewing()
        if not self.pool.ready_count():
            raise NotReady(self.pool.error())
        sync_wait = None if wait_to_end else self.sync_wait_seconds
        request_id = request.request_id or uuid.uuid4().hex
        parameters = recorded_parameters(request, self.keep_text)
        job = self.jobs.get(request_id)
        if job is not None:
            _refuse_if_reused(request_id, job.parameters, parameters, job.seed)
            _log(request_id).info("Repeated request_id: answering from this process")
            return await self._outcome(job, request.wait, sync_wait)
        if len(self.jobs.active()) >= self.max_jobs:
            raise QueueFull(self.pool.retry_after())
        # A caller that waits may wait behind MAX_QUEUE requests; one that polls, behind MAX_JOBS.
        self.pool.admit(None if request.wait else self.max_jobs)
        job = Job(request_id=request_id, request=request, parameters=parameters, seed=seed_for(request, request_id),
                  day=dt.datetime.now(dt.timezone.utc).strftime("%Y/%m/%d"))
        # The work runs as its own task: a caller that goes away (a client or load-balancer timeout) does not
        # cancel it, so the images are still stored and a retry with this id gets the answer.
        job.work = asyncio.ensure_future(self._serve(job))
        self.jobs.add(job)
        return await self._outcome(job, request.wait, sync_wait)

    async def poll(self, request_id: str) -> Generation | PendingResponse:
        """The answer to an earlier request (200), its status (202), or why there is none."""
        job = self.jobs.get(request_id)
        if job is not None:
            return await self._outcome(job, wait=False, sync_wait=0)
        if self.ledger is None:
            raise RequestProblem(404, "unknown_request", f"no request '{request_id}' is known")
        try:
            found = await self._in_io(self.ledger.read, request_id)
        except StoreError as exc:
            raise RequestProblem(503, "ledger_unavailable", f"cannot read the request's record now: {exc}",
                                 retry_after=10) from None
        if found is None:
            raise RequestProblem(404, "unknown_request", f"no request '{request_id}' was ever accepted")
        record, _ = found
        if record.state == "done":
            return Generation(response=PredictResponse.model_validate(record.answer), files=[])
        if record.state == "failed":
            raise RequestProblem(**record.error)
        if record.lease_live():
            return self._pending_from_record(record)
        raise RequestProblem(409, "request_interrupted",
                             f"the server running '{request_id}' stopped before it finished; send the same request "
                             "again (its request_id and fields) to run it again, with the same seed and image names")

    # -- the work of one request ------------------------------------------------------------------

    async def _serve(self, job: Job) -> Generation:
        admitted = True
        try:
            if self.ledger is not None:
                found = await self._claim(job)
                if found is not None:  # someone else's record
                    self.pool.withdraw()
                    admitted = False
                    try:
                        outcome = await self._follow(job, *found)
                    except StoreError as exc:  # the store failed while following: serve it as in an outage
                        _log(job.request_id).warning("Cannot follow its record (%s): generating it here with the "
                                                     "recorded seed, under the same names", exc)
                        job.record = job.etag = None
                        job.seed, job.day = found[0].seed, found[0].day
                        outcome = None
                    if isinstance(outcome, Generation):
                        return outcome
                    self.pool.admit(self.max_jobs)  # taken over: this process generates it now
                    admitted = True
            admitted = False  # from here the pool counts it out itself
            return await self._generate(job)
        except BaseException as exc:
            if admitted:
                self.pool.withdraw()
            await self._close_failed(job, exc)
            raise

    async def _claim(self, job: Job) -> tuple[Record, str] | None:
        """Claim the id in the ledger; someone else's record if it holds one. An outage leaves the job unrecorded."""
        record = self.ledger.new_record(job.request_id, job.seed, job.parameters, job.day)
        if time.monotonic() < self._ledger_down_until:
            _log(job.request_id).warning("The ledger's store failed moments ago: serving it from this process; "
                                         "its record is written once the store is back")
            return None
        try:
            claim = await self._in_io(self.ledger.claim, record)
        except StoreError as exc:
            self._ledger_down_until = time.monotonic() + LEDGER_PAUSE_SECONDS
            _log(job.request_id).warning("Cannot claim the request in the ledger (%s): serving it from this "
                                         "process; its record is written once the store is back", exc)
            return None
        if claim.mine:
            job.record, job.etag = claim.record, claim.etag
            return None
        return claim.record, claim.etag

    async def _follow(self, job: Job, record: Record, etag: str) -> Generation | None:
        """Wait for another owner's record to finish; None once this process took it over (its owner died)."""
        _refuse_if_reused(job.request_id, record.parameters, job.parameters, record.seed)
        interval = max(0.2, min(2.0, self.ledger.lease_seconds / 5))
        while True:
            job.state = record.state if record.state in ("queued", "running") else job.state
            if record.state == "done":
                _log(job.request_id).info("Answering the recorded answer (owner %s)", record.owner)
                job.state = "done"
                return Generation(response=PredictResponse.model_validate(record.answer), files=[])
            if record.state == "failed" and record.error["status"] < 500:
                raise RequestProblem(**record.error)  # the request's own fault: it would fail again
            if record.state == "failed" or not record.lease_live():  # a service failure, or a dead owner
                taken = await self._in_io(self.ledger.take_over, record, etag)
                if taken is not None:
                    _log(job.request_id).warning("Took over from %s (%s): generating again with seed %d under the "
                                                 "same names", record.owner, "it failed" if record.state == "failed"
                                                 else "its lease expired", record.seed)
                    job.record, job.etag = taken
                    job.seed, job.day, job.state = record.seed, record.day, "queued"
                    return None
            await asyncio.sleep(interval)
            found = await self._in_io(self.ledger.read, job.request_id)
            if found is None:  # deleted (a lifecycle rule): claim it afresh
                claim = await self._in_io(self.ledger.claim, self.ledger.new_record(
                    job.request_id, job.seed, job.parameters, job.day))
                if claim.mine:
                    job.record, job.etag = claim.record, claim.etag
                    return None
                found = claim.record, claim.etag
            record, etag = found

    async def _generate(self, job: Job) -> Generation:
        loop = asyncio.get_running_loop()
        request, inputs = job.request, NO_INPUTS
        if request.image is not None:
            try:  # here, inside the tracked work: a repeat of this id waits for it rather than decoding again
                request, inputs = await loop.run_in_executor(self._io, self.inputs.prepare, request)
            except BaseException:
                self.pool.withdraw()
                raise
        generated = await self.pool.generate(request, job.request_id, job.seed, inputs, watcher=job)
        images = generated.images
        if inputs.mask is not None:  # here rather than on the device's thread, which takes its next request
            images = await loop.run_in_executor(self._io, keep_outside_mask, images, inputs)
        model = self.pool.model()
        written = await loop.run_in_executor(
            self._io, self.writer.write, request, job.request_id, job.seed, images,
            model[0] if model else "", inputs, dt.datetime.strptime(job.day, "%Y/%m/%d"))
        response = PredictResponse(
            request_id=job.request_id,
            seed=job.seed,
            images=written.images,
            timings_ms={
                "queue": round(generated.queue_seconds * 1000),
                "generate": round(generated.generate_seconds * 1000),
                "encode": round(written.encode_seconds * 1000),
                "store": round(written.store_seconds * 1000),
            },
        )
        await self._record_done(job, response)
        job.state = "done"
        return Generation(response=response, files=written.files)

    # -- the ledger around a job --------------------------------------------------------------------

    async def _record_done(self, job: Job, response: PredictResponse) -> None:
        """Write the answer into the record (without inline image data), before the caller gets it."""
        if self.ledger is None:
            return
        answer = response.model_dump(mode="json", exclude={"images": {"__all__": {"data"}}})
        async with job.lock:
            if job.record is not None and job.etag is not None:
                record = replace(job.record, state="done", answer=answer, lease_expires=0.0)
                try:
                    etag = await self._in_io(self.ledger.write, record, job.etag)
                except StoreError as exc:
                    _log(job.request_id).warning("Cannot record the answer now (%s): the spool writes it later", exc)
                    self._spool_record(record, if_absent=False)
                    return
                if etag is None:
                    _log(job.request_id).warning("Its record changed meanwhile (a takeover after a missed renewal); "
                                                 "that one answers with the same seed and image names")
                else:
                    job.record, job.etag = record, etag
            elif job.record is None:  # never claimed: the store was down; the first record written wins
                record = replace(self.ledger.new_record(job.request_id, job.seed, job.parameters, job.day),
                                 state="done", answer=answer, lease_expires=0.0)
                self._spool_record(record, if_absent=True)

    def _spool_record(self, record: Record, if_absent: bool) -> None:
        self.writer.store.put(ImageObject(name=self.ledger.name(record.request_id), data=record.to_json(),
                                          content_type="application/json", request_id=record.request_id,
                                          if_absent=if_absent))

    async def _close_failed(self, job: Job, exc: BaseException) -> None:
        """Record a failed job's error, so that a poll answers it. The same request sent again meets the same
        error when it was its own (4xx: its input); a failure of the service (5xx) is run again instead."""
        job.state = "failed"
        if self.ledger is None or job.record is None or job.etag is None or isinstance(exc, asyncio.CancelledError):
            return  # not ours to write; or the server is stopping: the lease expires and another takes over
        async with job.lock:
            try:
                await self._in_io(self.ledger.write, replace(job.record, state="failed", error=failure(exc),
                                                             lease_expires=0.0), job.etag)
            except StoreError as store_error:
                _log(job.request_id).warning("Cannot record its failure (%s): it expires with its lease", store_error)
            job.etag = None

    def _start_renewing(self) -> None:
        if self.ledger is not None and self._renewing is None:
            self._renewing = asyncio.ensure_future(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Renew the lease of every record this process holds, a third of a lease apart, with its state."""
        while True:
            await asyncio.sleep(self.ledger.lease_seconds / 3)
            for job in self.jobs.active():
                try:
                    await self._renew(job)
                except Exception:  # noqa: BLE001 - one record's trouble must not stop the renewals
                    log.exception("[%s] Renewing its lease failed", job.request_id)

    async def _renew(self, job: Job) -> None:
        async with job.lock:
            if job.record is None or job.etag is None or job.state not in ("queued", "running"):
                return
            record = replace(self.ledger.renewed(job.record), state=job.state)
            try:
                etag = await self._in_io(self.ledger.write, record, job.etag)
            except StoreError as exc:
                _log(job.request_id).warning("Cannot renew its lease now (%s)", exc)
                return
            if etag is None:
                _log(job.request_id).warning("Lost its record to a takeover (a renewal came too late); finishing "
                                             "anyway: the same seed makes the same images")
                job.etag = None
                return
            job.record, job.etag = record, etag

    # -- answers ------------------------------------------------------------------------------------

    async def _outcome(self, job: Job, wait: bool, sync_wait: float | None) -> Generation | PendingResponse:
        if job.answer is not None:  # done: images the spool has stored since are answered as stored
            return Generation(response=self.writer.as_stored_since(job.answer), files=[])
        if job.work.done() or wait:
            try:
                result = await asyncio.wait_for(asyncio.shield(job.work), None if job.work.done() else sync_wait)
            except TimeoutError:
                return self._pending(job)
            # Images the spool has stored since the answer was made are answered as stored.
            return Generation(response=self.writer.as_stored_since(result.response), files=result.files)
        return self._pending(job)

    def _pending(self, job: Job) -> PendingResponse:
        progress = job.progress if job.state == "running" else None
        return PendingResponse(
            request_id=job.request_id, status="running" if job.state == "running" else "queued",
            position=self.pool.position(job.request_id) if job.state == "queued" else None,
            progress=Progress(step=progress[0], steps=progress[1]) if progress else None,
            retry_after=self._retry_after(progress))

    def _pending_from_record(self, record: Record) -> PendingResponse:
        return PendingResponse(request_id=record.request_id, status=record.state, position=None, progress=None,
                               retry_after=self.pool.retry_after())

    def _retry_after(self, progress: tuple[int, int] | None) -> int:
        """About when it may be done: the rest of one generation, at least a second."""
        seconds = self.pool.retry_after() * max(1, self.pool.ready_count())  # one generation
        if progress is not None:
            seconds *= 1 - progress[0] / max(1, progress[1])
        return max(1, math.ceil(seconds))

    async def _in_io(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, function, *args)

    def shutdown(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
        self.pool.shutdown()
        self._io.shutdown(wait=True)
        self.writer.stop()


def failure(exc: BaseException) -> dict:
    """The error a failed request answers, as its record keeps it (no internals: the log has those)."""
    if isinstance(exc, (InputError, RequestProblem)):
        return {"status": exc.status, "code": exc.code, "message": str(exc), "field": exc.field}
    if isinstance(exc, NotReady):
        return {"status": 503, "code": "not_ready", "message": str(exc), "field": None}
    if isinstance(exc, QueueFull):
        return {"status": 429, "code": "queue_full", "message": str(exc), "field": None}
    return {"status": 500, "code": "internal_error", "message": "generation failed; the server log has the details",
            "field": None}


def _refuse_if_reused(request_id: str, recorded: dict, sent: dict, recorded_seed: int) -> None:
    differ = differing_fields(recorded, sent, recorded_seed)
    if differ:
        raise RequestProblem(409, "request_id_reused",
                             f"request_id '{request_id}' was first sent with other values of: {', '.join(differ)}; "
                             "use a new request_id for a new request", field=differ[0])
