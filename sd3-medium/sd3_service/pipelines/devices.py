"""The device pool: one pipeline per device, one shared queue, admission and Retry-After.

Each device has its own worker thread and its own pipeline (its own scheduler state); every worker
takes the next request from the one shared queue, so a device never idles while a request waits and
a request never waits behind another device's work. The weights are read once, then placed on each
device in turn; each device warms up on its own thread, so they warm up together.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sd3_service.errors import not_ready, queue_full
from sd3_service.metrics import METRICS
from sd3_service.pipelines.generation import generate_images, generation_arguments, is_device_failure
from sd3_service.pipelines.loading import LoadedPipeline, LoadedWeights
from sd3_service.spec import DEFAULT_SIDE, NO_INPUTS, ImageRequest, Inputs, ResolvedLora

log = logging.getLogger("sd3.pool")

WARMUP_REQUEST = ImageRequest(prompt="warm-up", num_inference_steps=2, guidance_scale=7.0)
TYPICAL_REQUEST = ImageRequest(prompt="typical")  # the defaults: 28 steps at 1024², for estimates of unknown work


def work_of(request: ImageRequest) -> float:
    """What a generation costs in denoising steps times megapixels times images: time per unit is about constant
    on a device (the steps that run: fewer below strength 1 for a starting image)."""
    steps = request.num_inference_steps * (request.repaint_strength or 1.0)
    pixels = (request.width or DEFAULT_SIDE) * (request.height or DEFAULT_SIDE) / 1e6
    return max(1.0, steps) * pixels * request.num_images


@dataclass
class Device:
    """One device of the pool and where it stands."""

    name: str
    index: int  # its place in SD3_DEVICE: tells `cpu,cpu` apart in the log
    state: str = "loading"  # "loading" | "ready" | "failed"
    error: str | None = None
    pipeline: LoadedPipeline | None = None

    @property
    def label(self) -> str:
        return f"{self.name} (device {self.index})"

    @property
    def metric_label(self) -> str:
        """Its `device` label on /metrics: `cuda:N`, or `cpu:N` (N its place in SD3_DEVICE) for CPU devices."""
        return f"cpu:{self.index}" if self.name == "cpu" else self.name

    def set_state(self, state: str, error: str | None = None) -> None:
        self.state, self.error = state, error
        METRICS.device(self.metric_label, state)

    def describe(self) -> dict[str, str]:
        about = {"device": self.name, "state": self.state}
        if self.error:
            about["error"] = self.error
        return about


@dataclass(frozen=True)
class Generated:
    """A request's images and how they were made."""

    images: list
    device: str
    queue_seconds: float
    generate_seconds: float


class Watcher(Protocol):
    """Told where a request stands, from the device's worker thread."""

    def started(self) -> None: ...

    def step(self, step: int, steps: int) -> None: ...

    def preview(self, index: int, step: int, steps: int, images: list) -> None: ...


class Ticket:
    """One admitted request's place in the pool: counted in from `admit` until `release` (which `generate` calls
    when its generation ends), so a request that does not generate after all only releases its ticket."""

    def __init__(self, pool: DevicePool, request_id: str, work: float):
        self.pool = pool
        self.request_id = request_id
        self.work = work  # `work_of` its request
        self.started = False  # a device took it
        self.released = False

    def release(self) -> None:
        """Count the request out; a second call does nothing. Call on the event loop."""
        if not self.released:
            self.released = True
            self.pool._count_out(self)


@dataclass
class _Job:
    request: ImageRequest
    ticket: Ticket
    request_id: str
    seed: int
    inputs: Inputs
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    watcher: Watcher | None = None
    adapters: list[ResolvedLora] = field(default_factory=list)
    admitted: float = field(default_factory=time.perf_counter)


class DevicePool:
    """Runs generations on every device, from one queue.

    Args:
        find_devices: the device names, one pipeline each (`cuda:0`, `cpu`, ...); called on the loading
            thread, since finding GPUs imports torch, which must not delay the first /health answer.
        load_weights: reads the weights once for those devices (called on the loading thread).
        place: makes the pipeline for one device from the weights; `copy=False` for the last device,
            which may take the loaded weights themselves.
        max_queue: requests allowed to wait beyond the one running on each ready device.
    """

    def __init__(self, find_devices: Callable[[], list[str]], load_weights: Callable[[list[str]], LoadedWeights],
                 place: Callable[[LoadedWeights, str, bool], LoadedPipeline], max_queue: int = 4):
        self.devices: list[Device] = []  # known once the loading thread has found them
        self.max_queue = max_queue
        self._find_devices = find_devices
        self._error: str | None = None  # a failure before any device was known
        self._load_weights = load_weights
        self._place = place
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._waiting: list[Ticket] = []  # admitted and not taken by a device yet, in order (under `_lock`)
        self._seconds_per_work = 1.0  # seconds per step and megapixel (`work_of`): a running estimate, for Retry-After
        self._tickets: list[Ticket] = []  # admitted, not released (touched on the event loop only)
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    # -- start-up -------------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Load the weights and place them on each device in the background; `devices` shows progress."""
        thread = threading.Thread(target=self._load, name="sd3-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.devices = [Device(name, index) for index, name in enumerate(self._find_devices())]
            for device in self.devices:
                device.set_state("loading")
            weights = self._load_weights([device.name for device in self.devices])
        except BaseException as exc:  # noqa: BLE001 - any failure must reach /health, not end the thread silently
            log.exception("Loading the model failed; /health answers 503 failed")
            self._error = f"{type(exc).__name__}: {exc}"
            for device in self.devices:
                self._fail(device, exc)
            return
        log.info("Weights of %s read in %.1f s", weights.source.name, time.perf_counter() - started)
        last = len(self.devices) - 1
        for index, device in enumerate(self.devices):
            placing = time.perf_counter()
            try:
                device.pipeline = self._place(weights, device.name, index < last)
            except BaseException as exc:  # noqa: BLE001 - one device's failure leaves the others serving
                log.exception("Placing the model on %s failed; the other devices go on", device.label)
                self._fail(device, exc)
                continue
            if device.pipeline.loras is not None:
                device.pipeline.loras.device = device.label
            log.info("Placed on %s in %.1f s", device.label, time.perf_counter() - placing)
            worker = threading.Thread(target=self._serve, args=(device,), name=f"sd3-{device.name}", daemon=True)
            self._workers.append(worker)
            worker.start()
        del weights  # the last device holds its own reference; nothing else is kept

    def _serve(self, device: Device) -> None:
        """A device's worker: warm up, then run jobs from the shared queue until told to stop."""
        assert device.pipeline is not None
        warming = time.perf_counter()
        try:
            generate_images(device.pipeline.pipe, seed=0, **generation_arguments(WARMUP_REQUEST))
        except BaseException as exc:  # noqa: BLE001
            log.exception("The warm-up generation on %s failed; the other devices go on", device.label)
            self._fail(device, exc)
            return
        warm_up = time.perf_counter() - warming
        self._seconds_per_work = warm_up / work_of(WARMUP_REQUEST)  # per step: a 28-step request costs 14 warm-ups
        device.set_state("ready")
        log.info("%s ready: model %s (%s), warm-up %.1f s", device.label, device.pipeline.source.name,
                 device.pipeline.dtype, warm_up)
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._take(job.ticket)
            if not self._run(device, job):
                return

    def _run(self, device: Device, job: _Job) -> bool:
        """Run one job on the device; False when the device failed and must take no more."""
        started = time.perf_counter()
        log.info("[%s] Generating on %s", job.request_id, device.label)
        watcher = job.watcher
        METRICS.requests_running.inc()
        try:
            if watcher is not None:
                watcher.started()
            if device.pipeline.loras is not None:
                device.pipeline.loras.apply(job.adapters, job.request_id)
            images = generate_images(device.pipeline.for_mode(job.request.mode), seed=job.seed,
                                     on_step=watcher.step if watcher is not None else None,
                                     previews=job.request.previews if watcher is not None else 0,
                                     on_preview=watcher.preview if watcher is not None else None,
                                     **generation_arguments(job.request, job.inputs))
        except BaseException as exc:  # noqa: BLE001 - the caller gets the error; the worker decides whether to go on
            METRICS.requests_running.dec()
            job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            if is_device_failure(exc):
                log.error("[%s] %s failed (%s: %s): it takes no more requests; the other devices go on", job.request_id,
                          device.label,
                          type(exc).__name__, exc)
                self._fail(device, exc)
                return False
            return True
        finished = time.perf_counter()
        METRICS.requests_running.dec()
        METRICS.generated(device.metric_label, job.request.mode, len(images), finished - started)
        # Logged here, before this device takes its next job: the log's order is the devices' order.
        request = job.request
        log.info("[%s] Generated %d image(s) %dx%d (%s), %d steps, seed %d on %s in %.0f ms", job.request_id,
                 len(images), request.width, request.height, request.mode, request.num_inference_steps, job.seed,
                 device.label, (finished - started) * 1000)
        self._seconds_per_work = 0.8 * self._seconds_per_work + 0.2 * (finished - started) / work_of(request)
        generated = Generated(images=images, device=device.metric_label, queue_seconds=started - job.admitted,
                              generate_seconds=finished - started)
        job.loop.call_soon_threadsafe(_settle, job.future, generated, None)
        return True

    def _fail(self, device: Device, exc: BaseException) -> None:
        with self._lock:  # `generate` queues under this lock: nothing is queued after the last device's drain
            device.set_state("failed", f"{type(exc).__name__}: {exc}")
            device.pipeline = None
            if any(d.state != "failed" for d in self.devices):
                return
            # No device is left to take what waits: answer it rather than leave it queued for ever.
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    return
                if job is not None:
                    job.ticket.started = True
                    self._forget(job.ticket)
                    job.loop.call_soon_threadsafe(_settle, job.future, None, not_ready(self.error()))

    # -- state ----------------------------------------------------------------------------------

    def status(self) -> str:
        """`loading` until every device is ready or failed; then `ready` if one is ready, else `failed`."""
        states = {device.state for device in self.devices}
        if self._error is not None:
            return "failed"
        if "loading" in states or not states:
            return "loading"
        return "ready" if "ready" in states else "failed"

    def ready_count(self) -> int:
        return sum(device.state == "ready" for device in self.devices)

    def error(self) -> str:
        if self._error is not None and not self.devices:
            return self._error
        if len(self.devices) == 1 and self.devices[0].error:
            return self.devices[0].error
        return "; ".join(f"{d.name}: {d.error}" for d in self.devices if d.error) or "the model is still loading"

    def model(self) -> tuple[str, str] | None:
        """(model name, dtype) of the loaded pipelines, once one is placed."""
        source = self.source()
        return None if source is None else (source.name, self._placed().dtype)

    def source(self):
        """Where the loaded pipelines' weights came from (a `ModelSource`), once one is placed."""
        placed = self._placed()
        return None if placed is None else placed.source

    def _placed(self):
        return next((device.pipeline for device in self.devices if device.pipeline is not None), None)

    def lora_modules(self) -> dict[str, tuple[int, int]] | None:
        """The layers a LoRA adapter may adapt, once a device is placed; None when adapters are off (fused QKV)."""
        for device in self.devices:
            if device.pipeline is not None:
                return device.pipeline.lora_modules
        return None

    def loaded_loras(self) -> dict[str, list[str]]:
        """The sha256 of each device's loaded adapters, for /health."""
        return {device.metric_label: device.pipeline.loras.describe() for device in self.devices
                if device.pipeline is not None and device.pipeline.loras is not None}

    def fused_loras(self) -> list[ResolvedLora]:
        """The adapters `LORA_FUSE` fused into every device's weights, once one is placed."""
        for device in self.devices:
            if device.pipeline is not None:
                return device.pipeline.fused
        return []

    def seconds_for(self, request: ImageRequest | None) -> float:
        """About how long one generation of this request takes on a device (of a typical one for None)."""
        return self._seconds_per_work * work_of(request or TYPICAL_REQUEST)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: one of the admitted generations (their mean) ends within that."""
        work = [ticket.work for ticket in self._tickets] or [work_of(TYPICAL_REQUEST)]
        seconds = self._seconds_per_work * sum(work) / len(work)
        return max(1, math.ceil(seconds / max(1, self.ready_count())))

    # -- requests -------------------------------------------------------------------------------

    def admit(self, request_id: str, bound: int | None = None, request: ImageRequest | None = None) -> Ticket:
        """Count a request in, or refuse it (`ServiceError` 503 `not_ready`, 429 `queue_full`); call on the event
        loop, then `generate` with the ticket, or `release` it.

        `bound`: how many admitted requests may be ahead of it; by default one running on each ready device
        plus `max_queue` waiting (what a caller waiting for its answer may wait behind).
        """
        ready = self.ready_count()
        if not ready:
            raise not_ready(self.error())
        if self.admitted >= (ready + self.max_queue if bound is None else bound):
            raise queue_full(self.retry_after())
        ticket = Ticket(self, request_id, work_of(request or TYPICAL_REQUEST))
        self._tickets.append(ticket)
        with self._lock:
            self._waiting.append(ticket)
            METRICS.requests_waiting.set(len(self._waiting))
        return ticket

    @property
    def admitted(self) -> int:
        """Requests admitted and not released: waiting or generating."""
        return len(self._tickets)

    def position(self, request_id: str) -> int | None:
        """1 for the next request a device takes; None once it runs (or if it is not admitted here)."""
        with self._lock:
            for place, ticket in enumerate(self._waiting, start=1):
                if ticket.request_id == request_id:
                    return place
        return None

    def waiting_count(self) -> int:
        """Requests admitted and not taken by a device yet."""
        with self._lock:
            return len(self._waiting)

    async def generate(self, ticket: Ticket, request: ImageRequest, seed: int, inputs: Inputs = NO_INPUTS,
                       watcher: Watcher | None = None, adapters: list[ResolvedLora] | None = None) -> Generated:
        """Generate on the first free device, with `adapters` (LoRA) set on it; releases the ticket when done."""
        loop = asyncio.get_running_loop()
        job = _Job(request=request, ticket=ticket, request_id=ticket.request_id, seed=seed, inputs=inputs,
                   future=loop.create_future(), loop=loop, watcher=watcher, adapters=adapters or [])
        try:
            with self._lock:  # with `_fail`: the last device cannot fail between this check and the put
                if not self.ready_count():  # every device failed since admission
                    raise not_ready(self.error())
                self._queue.put(job)
            return await job.future
        finally:
            ticket.release()

    def _take(self, ticket: Ticket) -> None:
        with self._lock:
            ticket.started = True
            self._forget(ticket)

    def _count_out(self, ticket: Ticket) -> None:
        self._tickets.remove(ticket)
        with self._lock:
            self._forget(ticket)

    def _forget(self, ticket: Ticket) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            METRICS.requests_waiting.set(len(self._waiting))

    def shutdown(self) -> None:
        for _ in self._workers:
            self._queue.put(None)


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # its caller's task was cancelled with the loop
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
