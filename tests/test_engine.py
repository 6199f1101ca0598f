"""The engine without a server: ordering, overlap of GPU and storage, idempotency, queue bound, failures."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
import time

import pytest

from sd3_service.contract import PredictRequest
from sd3_service.engine import Engine, NotReady, QueueFull
from sd3_service.model_loading import LoadedPipeline, ModelSource
from sd3_service.spool import Spool, SpoolingStore
from sd3_service.store import LocalFolderStore, StoreError
from sd3_service.tiny_model import build_tiny_pipeline

SMALL = dict(width=256, height=256, num_inference_steps=2)


@pytest.fixture(scope="module")
def tiny() -> LoadedPipeline:
    return LoadedPipeline(pipe=build_tiny_pipeline(), source=ModelSource("tiny", "tiny", "test"),
                          device="cpu", dtype="float32")


class GatedStore(LocalFolderStore):
    """A real local store whose writes for one request wait until the test opens a gate.

    Stands in for a slow Object Storage upload, to show the GPU is not held while storing.
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


def ready_engine(tiny, store, **kwargs) -> Engine:
    engine = Engine(load=lambda: tiny, store=store, **kwargs)
    engine.start().join(60)
    assert engine.status == "ready", engine.error
    return engine


def test_the_next_generation_runs_while_the_previous_images_are_still_being_stored(tiny, tmp_path):
    store = GatedStore(tmp_path, gated_request="slow-store")
    engine = ready_engine(tiny, store)

    async def scenario():
        first = asyncio.ensure_future(engine.run(PredictRequest(prompt="a", request_id="slow-store", **SMALL)))
        second = await asyncio.wait_for(engine.run(PredictRequest(prompt="b", request_id="next", **SMALL)), 60)
        assert not first.done()  # the first request is still storing, yet the second has generated and stored
        store.gate.set()
        return await first, second

    first, second = asyncio.run(scenario())
    assert first.response.images[0].stored and second.response.images[0].stored
    engine.shutdown()


def test_a_repeated_request_id_is_generated_once(tiny, tmp_path):
    engine = ready_engine(tiny, LocalFolderStore(tmp_path))
    generated = []
    original = engine._generate

    async def counting(request, request_id):
        generated.append(request_id)
        return await original(request, request_id)

    engine._generate = counting  # count calls, then run the real method

    async def scenario():
        request = PredictRequest(prompt="a", request_id="same", **SMALL)
        return await asyncio.gather(engine.run(request), engine.run(request), engine.run(request))

    answers = asyncio.run(scenario())
    assert generated == ["same"]
    assert answers[0].response == answers[1].response == answers[2].response
    engine.shutdown()


def test_beyond_the_queue_bound_requests_get_queue_full_with_a_retry_estimate(tiny, tmp_path):
    engine = ready_engine(tiny, LocalFolderStore(tmp_path), max_queue=1)

    async def scenario():
        running = [asyncio.ensure_future(engine.run(PredictRequest(prompt=str(i), **SMALL))) for i in range(2)]
        await asyncio.sleep(0)  # both admitted: one generating, one waiting
        with pytest.raises(QueueFull) as refused:
            await engine.run(PredictRequest(prompt="third", **SMALL))
        assert refused.value.retry_after >= 1
        await asyncio.gather(*running)
        return await engine.run(PredictRequest(prompt="after", **SMALL))  # room again

    assert asyncio.run(scenario()).response.images
    engine.shutdown()


def test_a_failed_store_answers_the_image_inline_and_hands_it_over_for_later(tiny, tmp_path):
    store = GatedStore(tmp_path, gated_request="never-gated")
    store.fail = True
    kept = []
    engine = ready_engine(tiny, store, on_store_failure=kept.append)
    answer = asyncio.run(engine.run(PredictRequest(prompt="a", **SMALL))).response
    [image] = answer.images
    assert image.stored is False and image.data
    assert [k.name for k in kept] == [image.object_name]
    assert image.uri == store.location(image.object_name).uri
    engine.shutdown()


def test_a_repeated_request_id_answers_images_the_spool_stored_since_as_stored(tiny, tmp_path):
    folder = GatedStore(tmp_path / "images", gated_request="never-gated")
    folder.fail = True
    spooling = SpoolingStore(folder, Spool(tmp_path / "spool"))
    calls = []

    def counting_pipe(**kwargs):  # the real pipeline, with its calls counted
        calls.append(kwargs["prompt"])
        return tiny.pipe(**kwargs)

    engine = ready_engine(tiny, spooling, on_store_failure=spooling.keep, stored_later=spooling.stored_later)
    engine.loaded = LoadedPipeline(pipe=counting_pipe, source=tiny.source, device="cpu", dtype="float32")
    request = PredictRequest(prompt="a", request_id="outage-1", **SMALL)
    [first] = asyncio.run(engine.run(request)).response.images
    assert first.stored is False and first.data
    assert asyncio.run(engine.run(request)).response.images == [first]  # still waiting in the spool

    folder.fail = False
    assert spooling.upload_pending()

    [again] = asyncio.run(engine.run(request)).response.images
    assert again.stored is True and again.data is None
    assert (again.uri, again.object_name, again.sha256) == (first.uri, first.object_name, first.sha256)
    assert hashlib.sha256((tmp_path / "images" / again.object_name).read_bytes()).hexdigest() == first.sha256
    assert calls == ["a"]  # repeats never generate
    engine.shutdown()


def test_a_store_that_raises_something_unexpected_still_loses_no_image(tiny, tmp_path):
    class BuggyStore(LocalFolderStore):
        def put(self, image):
            raise KeyError("token")  # not a StoreError: a bug, or an SDK error the store did not expect

    kept = []
    engine = ready_engine(tiny, BuggyStore(tmp_path), on_store_failure=kept.append, store_params=True)
    [image] = asyncio.run(engine.run(PredictRequest(prompt="a", **SMALL))).response.images
    assert image.stored is False and hashlib.sha256(base64.b64decode(image.data)).hexdigest() == image.sha256
    assert [k.name for k in kept] == [image.object_name, image.object_name.rsplit("-", 1)[0] + ".json"]
    engine.shutdown()


def test_requests_before_ready_and_after_a_failed_load_are_refused(tiny, tmp_path):
    gate = threading.Event()

    def slow_then_broken():
        gate.wait(30)
        raise OSError("no model_index.json in /models/x")

    engine = Engine(load=slow_then_broken, store=LocalFolderStore(tmp_path))
    loader = engine.start()
    assert engine.health() == (503, {"status": "loading"})
    with pytest.raises(NotReady):
        asyncio.run(engine.run(PredictRequest(prompt="a")))
    gate.set()
    loader.join(30)
    status, body = engine.health()
    assert status == 503 and body["status"] == "failed" and "model_index.json" in body["error"]
    with pytest.raises(NotReady, match="model_index.json"):
        asyncio.run(engine.run(PredictRequest(prompt="a")))


def test_a_caller_that_goes_away_loses_nothing_and_its_retry_gets_the_first_answer(tiny, tmp_path):
    calls = []

    def counting_pipe(**kwargs):  # the real pipeline, with its calls counted
        calls.append(kwargs["prompt"])
        return tiny.pipe(**kwargs)

    engine = ready_engine(tiny, LocalFolderStore(tmp_path))
    engine.loaded = LoadedPipeline(pipe=counting_pipe, source=tiny.source, device="cpu", dtype="float32")
    request = PredictRequest(prompt="a", request_id="timed-out", **SMALL)

    async def scenario():
        caller = asyncio.ensure_future(engine.run(request))
        await asyncio.sleep(0.05)  # generating now
        caller.cancel()  # what a client or load-balancer timeout does to the request
        with pytest.raises(asyncio.CancelledError):
            await caller
        retried = await asyncio.wait_for(engine.run(request), 60)  # waits for the same work, no new generation
        return retried

    answer = asyncio.run(scenario()).response
    [image] = answer.images
    assert image.stored and (tmp_path / image.object_name).is_file()
    assert engine._admitted == 0
    assert calls == ["a"]  # generated once: the retry got the work the first caller started
    engine.shutdown()
