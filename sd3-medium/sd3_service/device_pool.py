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

from sd3_service.contract import PredictRequest
from sd3_service.generation import generate_images, generation_arguments
from sd3_service.inputs import NO_INPUTS, Inputs
from sd3_service.model_loading import LoadedPipeline, LoadedWeights

log = logging.getLogger("sd3.pool")

WARMUP_REQUEST = PredictRequest(prompt="warm-up", num_inference_steps=2, guidance_scale=7.0)


class NotReady(Exception):
    """No device can generate: the model is still loading, or every device failed."""


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the generation queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


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


@dataclass
class _Job:
    request: PredictRequest
    request_id: str
    seed: int
    inputs: Inputs
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    watcher: Watcher | None = None
    admitted: float = field(default_factory=time.perf_counter)


def is_device_failure(exc: BaseException) -> bool:
    """Whether an error means the device itself is gone (a CUDA error), not just this request (say, out of memory)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or "CUDA error" in str(exc)


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
        self._admitted = 0  # requests admitted and not yet done generating (touched on the event loop only)
        self._waiting: list[str] = []  # request ids in the queue, in order (under `_lock`)
        self._seconds_per_generation = 1.0  # running estimate, for Retry-After
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
        self._seconds_per_generation = time.perf_counter() - warming
        device.state = "ready"
        log.info("%s ready: model %s (%s), warm-up %.1f s", device.label, device.pipeline.source.name,
                 device.pipeline.dtype, self._seconds_per_generation)
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting.remove(job.request_id)
            if not self._run(device, job):
                return

    def _run(self, device: Device, job: _Job) -> bool:
        """Run one job on the device; False when the device failed and must take no more."""
        started = time.perf_counter()
        log.info("[%s] Generating on %s", job.request_id, device.label)
        watcher = job.watcher
        try:
            if watcher is not None:
                watcher.started()
            images = generate_images(device.pipeline.for_mode(job.request.mode), seed=job.seed,
                                     on_step=watcher.step if watcher is not None else None,
                                     **generation_arguments(job.request, job.inputs))
        except BaseException as exc:  # noqa: BLE001 - the caller gets the error; the worker decides whether to go on
            job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            if is_device_failure(exc):
                log.error("[%s] %s failed (%s: %s): it takes no more requests; the other devices go on", job.request_id,
                          device.label,
                          type(exc).__name__, exc)
                self._fail(device, exc)
                return False
            return True
        finished = time.perf_counter()
        # Logged here, before this device takes its next job: the log's order is the devices' order.
        request = job.request
        log.info("[%s] Generated %d image(s) %dx%d (%s), %d steps, seed %d on %s in %.0f ms", job.request_id,
                 len(images), request.width, request.height, request.mode, request.num_inference_steps, job.seed,
                 device.label, (finished - started) * 1000)
        self._seconds_per_generation = 0.8 * self._seconds_per_generation + 0.2 * (finished - started)
        generated = Generated(images=images, device=device.label, queue_seconds=started - job.admitted,
                              generate_seconds=finished - started)
        job.loop.call_soon_threadsafe(_settle, job.future, generated, None)
        return True

    def _fail(self, device: Device, exc: BaseException) -> None:
        with self._lock:
            device.state, device.error = "failed", f"{type(exc).__name__}: {exc}"
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
                with self._lock:
                    self._waiting.remove(job.request_id)
                job.loop.call_soon_threadsafe(_settle, job.future, None, NotReady(self.error()))

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
        for device in self.devices:
            if device.pipeline is not None:
                return device.pipeline.source.name, device.pipeline.dtype
        return None

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: one of the running generations ends within that."""
        return max(1, math.ceil(self._seconds_per_generation / max(1, self.ready_count())))

    # -- requests -------------------------------------------------------------------------------

    def admit(self, bound: int | None = None) -> None:
        """Count a request in, or refuse it (`NotReady`, `QueueFull`); call on the event loop, then `generate`.

        `bound`: how many admitted requests may be ahead of it; by default one running on each ready device
        plus `max_queue` waiting (what a caller waiting for its answer may wait behind).
        """
        ready = self.ready_count()
        if not ready:
            raise NotReady(self.error())
        if self._admitted >= (ready + self.max_queue if bound is None else bound):
            raise QueueFull(self.retry_after())
        self._admitted += 1

    def position(self, request_id: str) -> int | None:
        """1 for the next request a device takes; None once it runs (or if it is not queued here)."""
        with self._lock:
            return self._waiting.index(request_id) + 1 if request_id in self._waiting else None

    def withdraw(self) -> None:
        """Count out an admitted request that will not `generate` after all (say, its input image was refused)."""
        self._admitted -= 1

    async def generate(self, request: PredictRequest, request_id: str, seed: int,
                       inputs: Inputs = NO_INPUTS, watcher: Watcher | None = None) -> Generated:
        """Generate on the first free device; the request must have been admitted."""
        loop = asyncio.get_running_loop()
        job = _Job(request=request, request_id=request_id, seed=seed, inputs=inputs, future=loop.create_future(),
                    loop=loop, watcher=watcher)
        try:
            if not self.ready_count():  # every device failed since admission
                raise NotReady(self.error())
            with self._lock:
                self._waiting.append(request_id)
            self._queue.put(job)
            return await job.future
        finally:
            self._admitted -= 1

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
