"""A request's lifecycle: the jobs this process holds, and the ledger's choreography across instances.

Every request is a job with an id. This process answers a repeated id from the jobs it holds; else the
ledger (a record per id in the store) says whether another process, instance or earlier run owns it:
its answer when done, its state while it runs, a takeover when its owner died. While a job runs, its
record's lease is renewed; when it ends, its answer or its error is written into the record. When the
store cannot be reached a request is served as without a ledger, and its record is written once the
store is back.

The engine calls, in order: `held` (a repeat?), `check_room` and `open` (a new job), `claim` (ours, or
another owner's record), `follow` (that owner's answer, or a takeover), then `done` or `failed`; `lookup`
answers polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Protocol

from sd3_service.errors import ServiceError, queue_full
from sd3_service.jobs.book import Job, JobBook
from sd3_service.jobs.ledger import Ledger, Record, differing_fields
from sd3_service.metrics import METRICS
from sd3_service.spec import Answer
from sd3_service.storage.store import ImageObject, StoreError

log = logging.getLogger("sd3.jobs")


class RecordSpool(Protocol):
    def put(self, image: ImageObject):
        """Store an object now, or keep it and store it once the store is back (never raises)."""

    def nudge(self) -> None:
        """The store answered again: upload what was kept now, not after a backoff."""


@dataclass(frozen=True)
class Takeover:
    """A request this process must generate after following another owner's record: with the recorded seed and
    day, so that it makes the same images under the same names."""

    seed: int
    day: str


class RequestLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['request_id']}] {msg}", kwargs


def request_log(request_id: str, logger: logging.Logger = log) -> RequestLog:
    """A logger whose every line names the request."""
    return RequestLog(logger, {"request_id": request_id})


class Lifecycle:
    """Where each request stands: in this process (`JobBook`), and across instances (`Ledger`).

    Args:
        book: the jobs this process holds and its latest answers.
        ledger: the request records in the store; None serves from this process's memory only.
        spool: where a record goes when the store cannot take it now (the image writer's spooling store).
        io: the threads that make the ledger's store calls: its own, so that encoding, uploads and adapter downloads
            never delay a lease renewal (a late one lets another instance take the request over).
        max_jobs: jobs this process holds (queued or running) before it answers 429.
        pause_seconds: after a failed claim, requests skip the ledger this long (each claim may retry ~6 s).
    """

    def __init__(self, book: JobBook, ledger: Ledger | None, spool: RecordSpool, io: Executor, max_jobs: int = 64,
                 pause_seconds: float = 10.0):
        self.book = book
        self.ledger = ledger
        self.spool = spool
        self.io = io
        self.max_jobs = max_jobs
        self.pause_seconds = pause_seconds
        self.on_finished_record = None  # told of each finished record a poll or a repeat reads
        self._down_until = 0.0
        self._store_failed = False  # a ledger call failed since the last one that worked
        self._renewing: asyncio.Task | None = None

    # -- this process -------------------------------------------------------------------------------

    def held(self, request_id: str, parameters: dict) -> Job | None:
        """The job this process holds for the id, if any; 409 if it was sent with other parameters."""
        job = self.book.get(request_id)
        if job is not None:
            refuse_if_reused(request_id, job.parameters, parameters, job.seed)
        return job

    def check_room(self, retry_after: int) -> None:
        """429 `queue_full` when this process already holds `max_jobs` jobs (queued or running)."""
        if len(self.book.active()) >= self.max_jobs:
            raise queue_full(retry_after)

    def open(self, job: Job, work) -> Job:
        """Hold a new job whose work is `work` (a coroutine, run as its own task)."""
        self._start_renewing()
        # Its own task: a caller that goes away (a client or load-balancer timeout) does not cancel it, so the
        # images are still stored and a retry with this id gets the answer.
        job.work = asyncio.ensure_future(work)
        self.book.add(job)
        return job

    def active(self) -> list[Job]:
        return self.book.active()

    # -- the ledger ---------------------------------------------------------------------------------

    async def claim(self, job: Job) -> tuple[Record, str] | None:
        """Claim the id in the ledger: None when this process owns it (or the store is down: it is then served
        as without a ledger), else the record someone else holds, with its etag."""
        if self.ledger is None:
            return None
        record = self.ledger.new_record(job.request_id, job.seed, job.parameters, job.day)
        if time.monotonic() < self._down_until:
            request_log(job.request_id).warning("The ledger's store failed moments ago: serving it from this "
                                                "process; its record is written once the store is back")
            job.unclaimed = True
            return None
        try:
            claim = await self._in_io(self.ledger.claim, record)
        except StoreError as exc:
            self._store_down()
            request_log(job.request_id).warning("Cannot claim the request in the ledger (%s): serving it from this "
                                                "process; its record is written once the store is back", exc)
            job.unclaimed = True
            return None
        self._store_answered()
        if claim.mine:
            job.record, job.etag = claim.record, claim.etag
            return None
        return claim.record, claim.etag

    async def follow(self, job: Job, record: Record, etag: str) -> Answer | Takeover:
        """Wait for another owner's record to finish: its answer, or a `Takeover` once this process took it over (its
        owner died, or failed with a service error) and must generate it."""
        try:
            return await self._follow(job, record, etag)
        except StoreError as exc:  # the store failed while following: serve it as in an outage
            request_log(job.request_id).warning("Cannot follow its record (%s): generating it here with the "
                                                "recorded seed, under the same names", exc)
            job.record = job.etag = None
            return Takeover(record.seed, record.day)

    async def _follow(self, job: Job, record: Record, etag: str) -> Answer | Takeover:
        refuse_if_reused(job.request_id, record.parameters, job.parameters, record.seed)
        interval = max(0.2, min(2.0, self.ledger.lease_seconds / 5))
        while True:
            job.state = record.state if record.state in ("queued", "running") else job.state
            answer = recorded_outcome(record)
            if answer is not None:
                job.state = "done"
                return answer
            if record.state == "failed" or not record.lease_live():  # a service failure, or a dead owner
                taken = await self._in_io(self.ledger.take_over, record, etag)
                if taken is not None:
                    METRICS.takeovers.inc()
                    request_log(job.request_id).warning(
                        "Took over from %s (%s): generating again with seed %d under the same names", record.owner,
                        "it failed" if record.state == "failed" else "its lease expired", record.seed)
                    job.record, job.etag = taken
                    return Takeover(record.seed, record.day)
            await asyncio.sleep(interval)
            found = await self._in_io(self.ledger.read, job.request_id)
            if found is None:  # deleted (a lifecycle rule): claim it afresh
                claim = await self._in_io(self.ledger.claim, self.ledger.new_record(
                    job.request_id, job.seed, job.parameters, job.day))
                if claim.mine:
                    job.record, job.etag = claim.record, claim.etag
                    return Takeover(job.seed, job.day)
                found = claim.record, claim.etag
            record, etag = found

    async def done(self, job: Job, answer: Answer, webhooks: list | None = None) -> None:
        """Write the answer into the record (without inline image data), before the caller gets it; with the
        `webhooks` events still to send."""
        job.state = "done"
        if self.ledger is None:
            return
        recorded = answer.model_dump(mode="json", exclude={"images": {"__all__": {"data"}}})
        async with job.lock:
            if job.record is not None and job.etag is not None:
                record = replace(job.record, state="done", answer=recorded, lease_expires=0.0, webhooks=webhooks)
                try:
                    etag = await self._in_io(self.ledger.write, record, job.etag)
                except StoreError as exc:
                    request_log(job.request_id).warning("Cannot record the answer now (%s): the spool writes it "
                                                        "later", exc)
                    self._store_failed = True
                    await self._spool(record, if_absent=False)
                    return
                self._store_answered()
                if etag is None:
                    request_log(job.request_id).warning("Its record changed meanwhile (a takeover after a missed "
                                                        "renewal); that one answers with the same seed and names")
                else:
                    job.record, job.etag = record, etag
            elif job.record is None:  # never claimed: the store was down; the first record written wins
                record = replace(self.ledger.new_record(job.request_id, job.seed, job.parameters, job.day),
                                 state="done", answer=recorded, lease_expires=0.0, webhooks=webhooks)
                await self._spool(record, if_absent=True)

    async def failed(self, job: Job, exc: BaseException, webhooks: list | None = None) -> None:
        """Record a failed job's error, so that a poll answers it. The same request sent again meets the same
        error when it was its own (4xx: its input); a failure of the service (5xx) is run again instead."""
        job.state = "failed"
        if self.ledger is None or job.record is None or job.etag is None or isinstance(exc, asyncio.CancelledError):
            return  # not ours to write; or the server is stopping: the lease expires and another takes over
        async with job.lock:
            try:
                await self._in_io(self.ledger.write, replace(job.record, state="failed",
                                                             error=ServiceError.of(exc).to_record(),
                                                             lease_expires=0.0, webhooks=webhooks), job.etag)
            except StoreError as store_error:
                request_log(job.request_id).warning("Cannot record its failure (%s): it expires with its lease",
                                                    store_error)
            job.etag = None

    def webhook_noted(self, request_id: str, event_id: str, changes: dict,
                      unless_held: float | None = None) -> Record | None:
        """Apply `changes` to a webhook event in the request's record (how it ended, who holds it until when);
        blocking, so called off the event loop. `unless_held`: only if no one holds it at that time. The record
        written, or None when there was nothing to change (or someone else holds it)."""
        if self.ledger is None:
            return None
        for _ in range(3):  # another writer may have changed it meanwhile: read it again
            found = self.ledger.read(request_id)
            if found is None or not found[0].webhooks:
                return None
            record, etag = found
            event = next((event for event in record.webhooks if event.get("id") == event_id), None)
            if event is None or event.get("state") != "pending":
                return None
            if unless_held is not None and event.get("held_until", 0) > unless_held:
                return None
            events = [{**event, **changes} if event.get("id") == event_id else event for event in record.webhooks]
            written = replace(record, webhooks=events)
            if self.ledger.write(written, etag) is not None:
                return written
        return None

    async def answered_before(self, request_id: str, parameters: dict, fused_known: bool = True) -> Answer | None:
        """The recorded answer of an id done before (elsewhere, or before a restart), read once, so that a repeat is
        answered before any admission (never refused for a full queue or a model still loading); its own recorded
        error (4xx) is raised. None for anything else: held here, no record, running, a service failure, the store
        down. `fused_known`: False while the model loads (the fused adapters are not known yet: taken as recorded).
        """
        if self.book.get(request_id) is not None:  # held here: answered from memory, no store call
            return None
        record = await self._recorded(request_id)
        if record is None:
            return None
        if not fused_known:
            parameters = {**parameters, "fused_loras": record.parameters.get("fused_loras", [])}
            if not parameters["fused_loras"]:
                del parameters["fused_loras"]
        refuse_if_reused(request_id, record.parameters, parameters, record.seed)
        return recorded_outcome(record)

    async def _recorded(self, request_id: str) -> Record | None:
        """The id's record, read once; None without a ledger, without a record, or while the store cannot say."""
        if self.ledger is None or time.monotonic() < self._down_until:
            return None
        try:
            found = await self._in_io(self.ledger.read, request_id)
        except StoreError as exc:
            request_log(request_id).warning("Cannot read its record now (%s): served as a new request", exc)
            return None
        if found is not None:
            self._seen_finished(found[0])
        return None if found is None else found[0]

    def _seen_finished(self, record: Record) -> None:
        """A finished record read for a poll or a repeat: its webhook events that nobody holds are adopted."""
        if record.finished and record.webhooks and self.on_finished_record is not None:
            self.on_finished_record(record)

    async def lookup(self, request_id: str) -> Job | Answer | Record:
        """What a poll finds: the job this process holds, the recorded answer, or the record of a live request
        elsewhere; `ServiceError` for an unknown id, a failed request (its own error), an interrupted one."""
        job = self.book.get(request_id)
        if job is not None:
            return job
        if self.ledger is None:
            raise ServiceError(404, "unknown_request", f"no request '{request_id}' is known")
        try:
            found = await self._in_io(self.ledger.read, request_id)
        except StoreError as exc:
            raise ServiceError(503, "ledger_unavailable", f"cannot read the request's record now: {exc}",
                               retry_after=10) from None
        if found is None:
            raise ServiceError(404, "unknown_request", f"no request '{request_id}' was ever accepted")
        record, _ = found
        self._seen_finished(record)
        if record.state == "done":
            return Answer.model_validate(record.answer)
        if record.state == "failed":
            raise ServiceError.from_record(record.error)
        if record.lease_live():
            return record
        raise ServiceError(409, "request_interrupted",
                           f"the server running '{request_id}' stopped before it finished; send the same request "
                           "again (its request_id and fields) to run it again, with the same seed and image names")

    # -- leases -------------------------------------------------------------------------------------

    def _start_renewing(self) -> None:
        if self.ledger is not None and self._renewing is None:
            self._renewing = asyncio.ensure_future(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Renew the lease of every record this process holds, a third of a lease apart, with its state."""
        while True:
            await asyncio.sleep(self.ledger.lease_seconds / 3)
            for job in self.book.active():
                try:
                    await self._renew(job)
                except Exception:  # noqa: BLE001 - one record's trouble must not stop the renewals
                    log.exception("[%s] Renewing its lease failed", job.request_id)

    async def _renew(self, job: Job) -> None:
        async with job.lock:
            if job.unclaimed and job.state in ("queued", "running"):
                await self._claim_late(job)
                return
            if job.record is None or job.etag is None or job.state not in ("queued", "running"):
                return
            record = replace(self.ledger.renewed(job.record), state=job.state)
            try:
                etag = await self._in_io(self.ledger.write, record, job.etag)
            except StoreError as exc:
                request_log(job.request_id).warning("Cannot renew its lease now (%s)", exc)
                self._store_failed = True
                return
            self._store_answered()
            if etag is None:
                request_log(job.request_id).warning("Lost its record to a takeover (a renewal came too late); "
                                                    "finishing anyway: the same seed makes the same images")
                job.etag = None
                return
            job.record, job.etag = record, etag

    async def _claim_late(self, job: Job) -> None:
        """Claim a job served while the store was down, once it is back: other instances then see it (a poll, a
        repeat) while it still runs, rather than only once its answer is uploaded from the spool."""
        if time.monotonic() < self._down_until:
            return
        record = replace(self.ledger.new_record(job.request_id, job.seed, job.parameters, job.day), state=job.state)
        try:
            claim = await self._in_io(self.ledger.claim, record)
        except StoreError:
            self._store_down()
            return
        self._store_answered()
        job.unclaimed = False
        if claim.mine:
            job.record, job.etag = claim.record, claim.etag
            request_log(job.request_id).info("Claimed its record now that the store is back")
        else:  # another instance claimed the id meanwhile: the same seed and names make the same images
            request_log(job.request_id).warning("Another instance (%s) claimed it while the store was down here",
                                                claim.record.owner)

    def stop(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
        self.io.shutdown(wait=False)

    # -- internals

    def _store_down(self) -> None:
        self._down_until = time.monotonic() + self.pause_seconds
        self._store_failed = True

    def _store_answered(self) -> None:
        if self._store_failed:  # back after an outage: what the spool kept (records too) goes up now
            self._store_failed = False
            self.spool.nudge()

    async def _spool(self, record: Record, if_absent: bool) -> None:
        # Off the event loop: with the store still taken for up, this put is a store call with its retries.
        await self._in_io(self.spool.put, ImageObject(name=self.ledger.name(record.request_id), data=record.to_json(),
                                                      content_type="application/json",
                                                      request_id=record.request_id, if_absent=if_absent))

    async def _in_io(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.io, function, *args)


def recorded_outcome(record: Record) -> Answer | None:
    """A record's answer when it is done; its own error raised when it failed by the request's fault (4xx: it would
    fail again); None while it runs, or after a service failure (run again)."""
    if record.state == "done":
        request_log(record.request_id).info("Answering the recorded answer (owner %s)", record.owner)
        return Answer.model_validate(record.answer)
    if record.state == "failed" and record.error["status"] < 500:
        raise ServiceError.from_record(record.error)
    return None


def refuse_if_reused(request_id: str, recorded: dict, sent: dict, recorded_seed: int) -> None:
    """409 `request_id_reused` when a request differs from the one first sent with its id, naming the fields."""
    differ = differing_fields(recorded, sent, recorded_seed)
    if differ:
        raise ServiceError(409, "request_id_reused",
                           f"request_id '{request_id}' was first sent with other values of: {', '.join(differ)}; "
                           "use a new request_id for a new request", field=differ[0])
