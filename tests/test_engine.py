"""The engine without a server: the device pool, overlap of generation and storage, repeats, the queue bound,
failures."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import threading

import pytest

from sd3_service.compose import assemble
from sd3_service.errors import ServiceError
from sd3_service.jobs.ledger import Ledger, recorded_parameters
from sd3_service.pipelines.devices import DevicePool
from sd3_service.pipelines.loading import LoadedWeights, ModelSource, place_pipeline
from sd3_service.pipelines.tiny import build_tiny_pipeline
from sd3_service.settings import Settings
from sd3_service.spec import ImageRequest, Pending
from sd3_service.storage.records import LocalRecords
from sd3_service.storage.spool import Spool, SpoolingStore
from sd3_service.storage.store import LocalFolderStore, StoreError
from sd3_service.storage.writer import ImageWriter

SMALL = dict(width=256, height=256, num_inference_steps=2)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline()


class Pipe:
    """The real tiny pipeline, with its calls recorded; `gate` (when set) holds each call until it opens."""

    def __init__(self, pipe, calls: list, gate: threading.Barrier | None = None):
        self.pipe, self.calls, self.gate = pipe, calls, gate

    def __call__(self, **kwargs):
        if kwargs["prompt"] != "warm-up":
            self.calls.append(kwargs["prompt"])
            if self.gate is not None:
                self.gate.wait(30)  # every device must be inside a generation at once to pass
        return self.pipe(**kwargs)


class GatedStore(LocalFolderStore):
    """A real local store whose writes for one request wait until the test opens a gate.

    Stands in for a slow Object Storage upload, to show the devices are not held while storing.
    """

    def __init__(self, root, gated_request: str):
        super().__init__(root)
        self.gated_request = gated_request
        self.gate = threading.Event()
        self.fail = False

    def put(self, image):
        if self.gated_request in image.name:
            assert self.gate.wait(30)
        if self.fail:
            raise StoreError("bucket unreachable")
        return super().put(image)


def make_engine(tiny, store, tmp_path, devices=("cpu",), max_queue=4, calls=None, gate=None,
                store_params=False, ledger=None, max_jobs=64):
    """An engine on the real pool and writer, with the production placement of the tiny pipeline on each device."""
    source = ModelSource("tiny", "tiny", "test")
    settings = Settings(sd3_model="tiny")

    def place(weights, device, copy):
        placed = place_pipeline(weights, device, settings, copy=True)  # the module's pipeline stays as it is
        return dataclasses.replace(placed, pipe=Pipe(placed.pipe, calls if calls is not None else [], gate))

    pool = DevicePool(lambda: list(devices), lambda names: LoadedWeights(pipe=tiny, source=source, dtype="float32"),
                      place, max_queue=max_queue)
    writer = ImageWriter(SpoolingStore(store, Spool(tmp_path / "spool")), store_params=store_params)
    return assemble(pool, writer, ledger=ledger, max_jobs=max_jobs)


def ready(engine):
    engine.pool.start().join(60)
    for worker in engine.pool._workers:  # each device warms up on its own thread
        while engine.pool.status() == "loading" and worker.is_alive():
            worker.join(0.05)
    assert engine.pool.status() != "loading"
    return engine


def test_the_next_generation_runs_while_the_previous_images_are_still_being_stored(tiny, tmp_path):
    store = GatedStore(tmp_path, gated_request="slow-store")
    engine = ready(make_engine(tiny, store, tmp_path))

    async def scenario():
        first = asyncio.ensure_future(engine.run(ImageRequest(prompt="a", request_id="slow-store", **SMALL)))
        second = await asyncio.wait_for(engine.run(ImageRequest(prompt="b", request_id="next", **SMALL)), 60)
        assert not first.done()  # the first request is still storing, yet the second has generated and stored
        store.gate.set()
        return await first, second

    first, second = asyncio.run(scenario())
    assert first.answer.images[0].stored and second.answer.images[0].stored
    engine.shutdown()


def test_every_device_generates_at_once_from_the_one_queue(tiny, tmp_path):
    calls = []
    both_inside = threading.Barrier(2)  # passes only when two generations run at the same time
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path), tmp_path, devices=("cpu", "cpu"), calls=calls,
                               gate=both_inside))

    async def scenario():
        return await asyncio.gather(*(engine.run(ImageRequest(prompt=p, **SMALL)) for p in "ab"))

    answers = asyncio.run(scenario())
    assert sorted(calls) == ["a", "b"] and not both_inside.broken
    assert all(answer.answer.images[0].stored for answer in answers)
    assert [d["state"] for d in engine.health().details["devices"]] == ["ready", "ready"]
    engine.shutdown()


def test_a_device_that_fails_to_load_leaves_the_others_serving(tiny, tmp_path):
    # No GPU here: placing on cuda:7 fails for real, as a broken or missing GPU would.
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path), tmp_path, devices=("cpu", "cuda:7")))
    health = engine.health()
    assert health.status == "ready"
    cpu, gpu = health.details["devices"]
    assert cpu == {"device": "cpu", "state": "ready"}
    assert gpu["device"] == "cuda:7" and gpu["state"] == "failed" and gpu["error"]
    assert asyncio.run(engine.run(ImageRequest(prompt="a", **SMALL))).answer.images[0].stored
    engine.shutdown()


def test_a_repeated_request_id_is_generated_once(tiny, tmp_path):
    calls = []
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path), tmp_path, devices=("cpu", "cpu"), calls=calls))

    async def scenario():
        request = ImageRequest(prompt="a", request_id="same", **SMALL)
        return await asyncio.gather(engine.run(request), engine.run(request), engine.run(request))

    answers = asyncio.run(scenario())
    assert calls == ["a"]
    assert answers[0].answer == answers[1].answer == answers[2].answer
    engine.shutdown()


@pytest.mark.parametrize("devices", [("cpu",), ("cpu", "cpu")])
def test_beyond_the_queue_bound_requests_get_queue_full_with_a_retry_estimate(tiny, tmp_path, devices):
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path), tmp_path, devices=devices, max_queue=1))
    capacity = len(devices) + 1  # one running on each device, one waiting

    async def scenario():
        running = [asyncio.ensure_future(engine.run(ImageRequest(prompt=str(i), **SMALL)))
                   for i in range(capacity)]
        await asyncio.sleep(0)  # all admitted
        with pytest.raises(ServiceError, match="queue is full") as refused:
            await engine.run(ImageRequest(prompt="one too many", **SMALL))
        assert refused.value.retry_after >= 1
        await asyncio.gather(*running)
        return await engine.run(ImageRequest(prompt="after", **SMALL))  # room again

    assert asyncio.run(scenario()).answer.images
    assert engine.pool.admitted == 0
    engine.shutdown()


def test_a_failed_store_answers_the_image_inline_and_keeps_it_for_later(tiny, tmp_path):
    store = GatedStore(tmp_path / "images", gated_request="never-gated")
    store.fail = True
    engine = ready(make_engine(tiny, store, tmp_path))
    answer = asyncio.run(engine.run(ImageRequest(prompt="a", **SMALL))).answer
    [image] = answer.images
    assert image.stored is False and hashlib.sha256(base64.b64decode(image.data)).hexdigest() == image.sha256
    [kept] = engine.writer.store.spool.pending()
    assert engine.writer.store.spool.load(kept).image.name == image.object_name
    assert image.uri == store.location(image.object_name).uri
    engine.shutdown()


def test_a_repeated_request_id_answers_images_the_spool_stored_since_as_stored(tiny, tmp_path):
    folder = GatedStore(tmp_path / "images", gated_request="never-gated")
    folder.fail = True
    calls = []
    engine = ready(make_engine(tiny, folder, tmp_path, calls=calls))
    request = ImageRequest(prompt="a", request_id="outage-1", **SMALL)
    [first] = asyncio.run(engine.run(request)).answer.images
    assert first.stored is False and first.data
    assert asyncio.run(engine.run(request)).answer.images == [first]  # still waiting in the spool

    folder.fail = False
    assert engine.writer.store.upload_pending()

    [again] = asyncio.run(engine.run(request)).answer.images
    assert again.stored is True and again.data is None
    assert (again.uri, again.object_name, again.sha256) == (first.uri, first.object_name, first.sha256)
    assert hashlib.sha256((tmp_path / "images" / again.object_name).read_bytes()).hexdigest() == first.sha256
    assert calls == ["a"]  # repeats never generate
    engine.shutdown()


def test_a_store_that_raises_something_unexpected_still_loses_no_image(tiny, tmp_path):
    class BuggyStore(LocalFolderStore):
        def put(self, image):
            raise KeyError("token")  # not a StoreError: a bug, or an SDK error the store did not expect

    engine = ready(make_engine(tiny, BuggyStore(tmp_path / "images"), tmp_path, store_params=True))
    [image] = asyncio.run(engine.run(ImageRequest(prompt="a", **SMALL))).answer.images
    assert image.stored is False and hashlib.sha256(base64.b64decode(image.data)).hexdigest() == image.sha256
    spool = engine.writer.store.spool
    assert sorted(spool.load(path).image.name for path in spool.pending()) == \
        sorted([image.object_name, image.object_name.rsplit("-", 1)[0] + ".json"])
    engine.shutdown()


def test_requests_before_ready_and_after_a_failed_load_are_refused(tmp_path):
    gate = threading.Event()

    def slow_then_broken(devices):
        gate.wait(30)
        raise OSError("no model_index.json in /models/x")

    pool = DevicePool(lambda: ["cpu"], slow_then_broken, place=None)
    engine = assemble(pool, ImageWriter(SpoolingStore(LocalFolderStore(tmp_path), Spool(tmp_path / "spool"))))
    loader = pool.start()
    assert engine.health().status == "loading"
    with pytest.raises(ServiceError, match="still loading"):
        asyncio.run(engine.run(ImageRequest(prompt="a")))
    gate.set()
    loader.join(30)
    health = engine.health()
    assert health.status == "failed" and "model_index.json" in health.details["error"]
    assert health.details["devices"] == [{"device": "cpu", "state": "failed",
                                          "error": "OSError: no model_index.json in /models/x"}]
    with pytest.raises(ServiceError, match="model_index.json"):
        asyncio.run(engine.run(ImageRequest(prompt="a")))


def test_a_caller_that_goes_away_loses_nothing_and_its_retry_gets_the_first_answer(tiny, tmp_path):
    calls = []
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path), tmp_path, calls=calls))
    request = ImageRequest(prompt="a", request_id="timed-out", **SMALL)

    async def scenario():
        caller = asyncio.ensure_future(engine.run(request))
        while not calls:  # generating now
            await asyncio.sleep(0.01)
        caller.cancel()  # what a client or load-balancer timeout does to the request
        with pytest.raises(asyncio.CancelledError):
            await caller
        return await asyncio.wait_for(engine.run(request), 60)  # waits for the same work, no new generation

    answer = asyncio.run(scenario()).answer
    [image] = answer.images
    assert image.stored and (tmp_path / image.object_name).is_file()
    assert engine.pool.admitted == 0
    assert calls == ["a"]  # generated once: the retry got the work the first caller started
    engine.shutdown()


def test_a_device_that_fails_during_a_request_fails_that_request_and_the_others_go_on(tiny, tmp_path):
    # A CUDA error cannot happen on this CPU: the first device's pipeline raises the error torch gives for a
    # lost GPU (the one mocked part of this test).
    settings = Settings(sd3_model="tiny")
    placed = []

    class LostGpu:
        def __init__(self, pipe):
            self.pipe = pipe

        def __call__(self, **kwargs):
            if kwargs["prompt"] == "lose the gpu":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return self.pipe(**kwargs)

    def place(weights, device, copy):
        loaded = place_pipeline(weights, device, settings, copy=True)
        placed.append(device)
        return dataclasses.replace(loaded, pipe=LostGpu(loaded.pipe)) if len(placed) == 1 else loaded

    source = ModelSource("tiny", "tiny", "test")
    pool = DevicePool(lambda: ["cpu", "cpu"], lambda names: LoadedWeights(pipe=tiny, source=source, dtype="float32"),
                      place)
    engine = ready(assemble(pool, ImageWriter(SpoolingStore(LocalFolderStore(tmp_path), Spool(tmp_path / "spool")))))

    async def scenario():
        for _ in range(20):  # until one lands on the first device (the other device serves it fine)
            try:
                await engine.run(ImageRequest(prompt="lose the gpu", **SMALL))
            except RuntimeError as exc:
                return exc, await engine.run(ImageRequest(prompt="after", **SMALL))
        raise AssertionError("no request reached the first device")

    failed, after = asyncio.run(scenario())
    assert "CUDA error" in str(failed)
    first, second = engine.health().details["devices"]
    assert first["state"] == "failed" and "CUDA error" in first["error"]
    assert second == {"device": "cpu", "state": "ready"} and engine.health().status == "ready"
    assert after.answer.images[0].stored
    engine.shutdown()


def test_max_jobs_bounds_what_is_held_and_max_queue_what_a_waiting_caller_waits_behind(tiny, tmp_path):
    gate = threading.Event()

    class Held(LocalFolderStore):  # the first image's store waits for the gate: its request stays held
        def put(self, image):
            gate.wait(30)
            return super().put(image)

    engine = ready(make_engine(tiny, Held(tmp_path), tmp_path, max_queue=0, max_jobs=2))

    async def scenario():
        first = await engine.run(ImageRequest(prompt="a", wait=False, **SMALL))
        second = await engine.run(ImageRequest(prompt="b", wait=False, **SMALL))
        assert isinstance(first, Pending) and isinstance(second, Pending)
        with pytest.raises(ServiceError, match="queue is full"):  # a third held request: over MAX_JOBS
            await engine.run(ImageRequest(prompt="c", wait=False, **SMALL))
        gate.set()
        for pending in (first, second):
            while isinstance(await engine.poll(pending.request_id), Pending):
                await asyncio.sleep(0.05)
        return await engine.run(ImageRequest(prompt="d", **SMALL))

    async def waiting_caller_refused():
        gate.clear()
        held = await engine.run(ImageRequest(prompt="e", wait=False, **SMALL))
        while engine.pool.admitted:  # generated, and now held by its store
            await asyncio.sleep(0.05)
        blocker = await engine.run(ImageRequest(prompt="f", wait=False, **SMALL))
        with pytest.raises(ServiceError, match="queue is full"):  # the device is taken and MAX_QUEUE=0: a waiting caller may wait behind none
            await engine.run(ImageRequest(prompt="g", **SMALL))
        gate.set()
        for pending in (held, blocker):
            while isinstance(await engine.poll(pending.request_id), Pending):
                await asyncio.sleep(0.05)

    assert asyncio.run(scenario()).answer.images
    asyncio.run(waiting_caller_refused())
    engine.shutdown()


class FailsOnce:
    """The tiny pipeline, failing its first call as a bug in the service would."""

    def __init__(self, pipe):
        self.pipe, self.failed = pipe, False

    def __call__(self, **kwargs):
        if kwargs["prompt"] != "warm-up" and not self.failed:
            self.failed = True
            raise RuntimeError("a bug")
        return self.pipe(**kwargs)


def test_a_service_failure_is_recorded_for_polls_and_the_same_request_runs_again(tiny, tmp_path):
    ledger = Ledger(LocalRecords(tmp_path / "records"), "sd3/", lease_seconds=30, owner="me")
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path), tmp_path, ledger=ledger))
    placed = engine.pool.devices[0].pipeline
    placed.pipe = FailsOnce(placed.pipe)  # after the warm-up
    request = ImageRequest(prompt="a harbour", request_id="fails-once", **SMALL)

    async def scenario():
        with pytest.raises(RuntimeError):
            await engine.run(request)
        with pytest.raises(ServiceError) as polled:
            await engine.poll("fails-once")
        assert (polled.value.status, polled.value.code) == (500, "internal_error")
        return await engine.run(request)  # a service failure: the same request runs again

    assert asyncio.run(scenario()).answer.request_id == "fails-once"
    record, _ = ledger.read("fails-once")
    assert record.state == "done" and record.error is None
    engine.shutdown()


class RecordsThatFailReadsAfter(LocalRecords):
    """Local records whose reads fail (as a store going down) from the `fail_after`-th read on."""

    def __init__(self, root, fail_after: int):
        super().__init__(root)
        self.reads, self.fail_after = 0, fail_after

    def read_record(self, name):
        self.reads += 1
        if self.reads > self.fail_after:
            raise StoreError("the bucket stopped answering")
        return super().read_record(name)


def test_a_store_that_fails_while_following_anothers_record_still_answers(tiny, tmp_path):
    folder = tmp_path / "records"
    other = Ledger(LocalRecords(folder), "sd3/", lease_seconds=30, owner="another instance")
    request = ImageRequest(prompt="a harbour", request_id="followed", **SMALL)
    held = other.new_record("followed", seed=4242, parameters=recorded_parameters(request, False), day="2026/11/30")
    assert other.claim(held).mine  # alive elsewhere, its lease running
    # The read before admission (a repeat? no: running elsewhere) and the claim's read succeed (the record is someone
    # else's); the next read, while following, fails.
    ledger = Ledger(RecordsThatFailReadsAfter(folder, fail_after=2), "sd3/", lease_seconds=30, owner="me")
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path / "images"), tmp_path, ledger=ledger))

    answer = asyncio.run(engine.run(request)).answer
    assert answer.seed == 4242 and answer.images[0].object_name.startswith("sd3/2026/11/30/followed-")
    assert ledger.records.reads == 3
    engine.shutdown()


class RecordsThatHoldTheAnswer(LocalRecords):
    """Local records whose write of a finished record waits until the test opens a gate (a slow ledger write)."""

    def __init__(self, root):
        super().__init__(root)
        self.answering, self.gate = threading.Event(), threading.Event()

    def replace_record(self, name, data, etag):
        if b'"state": "done"' in data or b'"state":"done"' in data:
            self.answering.set()
            assert self.gate.wait(30)
        return super().replace_record(name, data, etag)


def test_a_poll_while_the_answer_is_being_recorded_says_running_not_queued(tiny, tmp_path):
    records = RecordsThatHoldTheAnswer(tmp_path / "records")
    ledger = Ledger(records, "sd3/", lease_seconds=30, owner="me")
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path), tmp_path, ledger=ledger))

    async def scenario():
        request = ImageRequest(prompt="a harbour", request_id="recording", wait=False, **SMALL)
        assert isinstance(await engine.run(request), Pending)
        await asyncio.get_running_loop().run_in_executor(None, records.answering.wait, 30)
        polled = await engine.poll("recording")  # generated and stored; its answer is being written
        records.gate.set()
        return polled, await engine.run(dataclasses.replace(request, wait=True))

    polled, answered = asyncio.run(scenario())
    assert (polled.status, polled.position) == ("running", None), polled
    assert answered.answer.request_id == "recording"
    engine.shutdown()
