"""The requests this process holds: running or waiting (`MAX_JOBS` of them), and the latest answers given.

A repeated `request_id` is answered from here first (the fast path, no store call); the ledger
(`ledger.py`) answers for the ids this process does not hold.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from sd3_service.jobs.ledger import Record
from sd3_service.spec import Answer, ImageRequest


@dataclass
class Job:
    """One request this process holds, and where it stands."""

    request_id: str
    request: ImageRequest | None  # dropped once done: it may hold megabytes of input image
    parameters: dict  # as the ledger records them (to refuse the id reused with other ones)
    seed: int
    day: str  # yyyy/mm/dd of its image names
    state: str = "queued"  # "queued" | "running" | "done" | "failed"
    work: asyncio.Future | None = None  # dropped once done, with the encoded images it ended with
    answer: Answer | None = None  # once done
    record: Record | None = None  # its record as last written; None: not in the ledger
    unclaimed: bool = False  # served without a claim while the store was down: claimed once it is back
    etag: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one ledger write at a time
    progress: tuple[int, int] | None = None  # (step, steps) while running; replaced whole, so read whole
    adapters: list = field(default_factory=list)  # the LoRA adapters it asked for, resolved (ResolvedLora)
    prepared: asyncio.Event = field(default_factory=asyncio.Event)  # its inputs read and checked (or followed)
    # Who streams it: each is told every step and preview (from the device's thread: they must be thread-safe).
    listeners: list[Callable[[tuple], None]] = field(default_factory=list)

    # Called from the device's worker thread (`device_pool.Watcher`).
    def started(self) -> None:
        self.state = "running"
        for listener in list(self.listeners):
            listener(("started",))

    def step(self, step: int, steps: int) -> None:
        self.progress = (step, steps)
        for listener in list(self.listeners):
            listener(("step", step, steps))

    def preview(self, index: int, step: int, steps: int, images: list) -> None:
        for listener in list(self.listeners):
            listener(("preview", index, step, steps, images))

    @property
    def active(self) -> bool:
        return self.work is not None and not self.work.done()


class JobBook:
    """Jobs by request id: every active one, and up to `size` finished ones; a failed job is forgotten."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def get(self, request_id: str) -> Job | None:
        return self._jobs.get(request_id)

    def active(self) -> list[Job]:
        return [job for job in self._jobs.values() if job.active]

    def add(self, job: Job) -> None:
        """Hold `job` (its `work` must be set): forgotten if the work fails, kept as an answer if it succeeds."""
        self._jobs[job.request_id] = job
        job.work.add_done_callback(lambda work: self._finished(job, work))

    def forget(self, job: Job) -> None:
        if self._jobs.get(job.request_id) is job:
            del self._jobs[job.request_id]

    def _finished(self, job: Job, work: asyncio.Future) -> None:
        if work.cancelled() or work.exception() is not None:
            self.forget(job)  # the id may be sent again (a recorded failure is answered by the ledger)
            return
        # Kept: the answer, without image data (a store outage must not fill memory with base64 copies: a repeat
        # reads a still unstored image from the spool). Dropped: the input images and the encoded output.
        job.answer, job.request, job.work = work.result().answer.without_data(), None, None
        finished = [rid for rid, held in self._jobs.items() if not held.active]
        for request_id in finished[:max(0, len(finished) - self.size)]:
            del self._jobs[request_id]
