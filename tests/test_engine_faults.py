"""The engine under faults at the worst moment, without a server: each test injects its fault with a gate at the
moment it names (a device failing during admission, a store call that hangs, a saturated I/O pool), never a sleep."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import queue
import threading

import pytest

from sd3_service.compose import IO_THREADS
from sd3_service.errors import ServiceError
from sd3_service.jobs.ledger import Ledger
from sd3_service.spec import ImageRequest, Pending
from sd3_service.storage.records import LocalRecords
from sd3_service.storage.store import LocalFolderStore, StoreError
from test_engine import SMALL, GatedStore, make_engine, ready, tiny  # noqa: F401 - `tiny` is a fixture


class Held:
    """A device's pipeline whose generations with a prompt starting `hold` wait until `release()`: `held` is set
    once one waits; `abort` makes the held one fail instead of generating (it need not cost a real generation)."""

    def __init__(self, pipe):
        self.pipe, self.held, self.gate, self.abort = pipe, threading.Event(), threading.Event(), False

    def __call__(self, **kwargs):
        if kwargs["prompt"].startswith("hold"):
            self.held.set()
            assert self.gate.wait(60)
            if self.abort:
                raise RuntimeError("stopped by the test")
        return self.pipe(**kwargs)

    def release(self, abort: bool = False) -> None:
        self.abort = abort
        self.gate.set()


def hold_device(engine, index: int = 0) -> Held:
    placed = engine.pool.devices[index].pipeline
    placed.pipe = Held(placed.pipe)  # after the warm-up
    return placed.pipe


def ledger_in(folder, owner: str = "me", lease_seconds: float = 30, records=None) -> Ledger:
    return Ledger(records or LocalRecords(folder), "sd3/", lease_seconds=lease_seconds, owner=owner)


def test_the_last_device_failing_between_the_ready_check_and_the_queue_fails_the_request_not_strands_it(tiny,
                                                                                                       tmp_path):
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path), tmp_path))
    pool = engine.pool
    [device] = pool.devices

    class FailsTheDeviceAtThePut(queue.Queue):
        def put(self, item, *args, **kwargs):
            # The ready check has passed: now the last device fails, on its own thread. It finishes at once unless
            # queueing is guarded against it, and then the job lands in a queue no device will ever read.
            failing = threading.Thread(target=pool._fail, args=(device, RuntimeError("CUDA error: device lost")))
            failing.start()
            failing.join(0.5)
            super().put(item, *args, **kwargs)

    pool._queue = FailsTheDeviceAtThePut()

    async def scenario():
        with pytest.raises(ServiceError) as refused:
            await asyncio.wait_for(engine.run(ImageRequest(prompt="a", request_id="stranded?", **SMALL)), 30)
        return refused.value

    refused = asyncio.run(scenario())
    assert (refused.status, refused.code) == (503, "not_ready") and "device lost" in refused.message
    assert pool.admitted == 0 and engine.lifecycle.active() == []  # its ticket released, no lease renewed for ever
    engine.shutdown()


class RecordsThatCannotRecordAnswers(LocalRecords):
    def replace_record(self, name, data, etag):
        if b'"state": "done"' in data or b'"state":"done"' in data:
            raise StoreError("the bucket stopped answering")
        return super().replace_record(name, data, etag)


class StoreThatHangsOnRecords(LocalFolderStore):
    """A local store whose put of a request record hangs until the test opens the gate (a store call retrying)."""

    def __init__(self, root):
        super().__init__(root)
        self.entered, self.gate = threading.Event(), threading.Event()

    def put(self, image):
        if "/requests/" in image.name:
            self.entered.set()
            assert self.gate.wait(30)
        return super().put(image)


def test_a_record_spooled_after_a_failed_ledger_write_never_holds_the_event_loop(tiny, tmp_path):
    store = StoreThatHangsOnRecords(tmp_path / "images")
    engine = ready(make_engine(tiny, store, tmp_path,
                               ledger=ledger_in(None, records=RecordsThatCannotRecordAnswers(tmp_path / "records"))))

    async def scenario():
        loop = asyncio.get_running_loop()
        alive = threading.Event()

        def watch() -> bool:
            store.entered.wait(30)  # the answer's record goes to the spooling store, whose put hangs
            loop.call_soon_threadsafe(alive.set)
            answered = alive.wait(10)  # the loop runs this callback at once, unless that put holds it
            store.gate.set()
            return answered

        watcher = loop.run_in_executor(None, watch)
        answer = await engine.run(ImageRequest(prompt="a", request_id="spooled-record", **SMALL))
        return await watcher, answer

    loop_answered, answer = asyncio.run(scenario())
    assert loop_answered and answer.answer.images[0].stored
    engine.shutdown()


class StoreThatHoldsImages(LocalFolderStore):
    """A local store whose image puts for `busy-` requests hang until the gate opens (or give up after 20 s, as
    the store's own timeout would); `hung` counts them."""

    def __init__(self, root):
        super().__init__(root)
        self.gate, self.lock, self.hung, self.gave_up = threading.Event(), threading.Lock(), 0, False
        self.all_hung = threading.Event()

    def put(self, image):
        if "busy-" in image.name:
            with self.lock:
                self.hung += 1
                if self.hung >= IO_THREADS:
                    self.all_hung.set()
            if not self.gate.wait(20):
                self.gave_up = True
                raise StoreError("the upload timed out")
        return super().put(image)


def test_a_lease_is_renewed_while_every_io_thread_hangs_on_an_upload(tiny, tmp_path):
    store = StoreThatHoldsImages(tmp_path / "images")
    records = LocalRecords(tmp_path / "records")
    engine = ready(make_engine(tiny, store, tmp_path, ledger=ledger_in(None, lease_seconds=1.5, records=records)))
    device = hold_device(engine)

    async def scenario():
        for n in range(IO_THREADS):  # each one's upload takes an I/O thread and hangs there
            assert isinstance(await engine.run(ImageRequest(prompt="a", request_id=f"busy-{n}", wait=False, **SMALL)),
                              Pending)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, store.all_hung.wait, 60)
        held = await engine.run(ImageRequest(prompt="hold", request_id="renewed", wait=False, **SMALL))
        assert isinstance(held, Pending)
        assert await loop.run_in_executor(None, device.held.wait, 60), "never claimed and started"
        leases = set()
        for _ in range(600):  # until renewed twice (a hang guard of a minute, not a time bound)
            leases.add(json.loads(records.read_record("sd3/requests/renewed.json")[0])["lease_expires"])
            if len(leases) >= 3:
                break
            await asyncio.sleep(0.1)
        still_hung = not store.gave_up
        store.gate.set()
        device.release()
        while isinstance(await engine.poll("renewed"), Pending):
            await asyncio.sleep(0.05)
        return leases, still_hung

    leases, still_hung = asyncio.run(scenario())
    assert len(leases) >= 3 and still_hung  # renewed (a lease a third of 1.5 s apart) while the uploads hung
    engine.shutdown()


def test_a_repeat_is_answered_from_its_record_before_admission_loading_or_with_every_device_busy(tiny, tmp_path):
    folder = tmp_path / "records"
    first = ready(make_engine(tiny, LocalFolderStore(tmp_path / "images"), tmp_path, ledger=ledger_in(folder, "one")))
    request = ImageRequest(prompt="a", request_id="answered-once", **SMALL)
    answer = asyncio.run(first.run(request)).answer
    first.shutdown()
    # A restart: not loaded yet, then loaded with its one device busy and no room in the queue.
    second = make_engine(tiny, LocalFolderStore(tmp_path / "images"), tmp_path, ledger=ledger_in(folder, "two"),
                         max_queue=0)
    assert asyncio.run(second.run(request)).answer == answer
    ready(second)
    device = hold_device(second)

    async def scenario():
        busy = asyncio.ensure_future(second.run(ImageRequest(prompt="hold", **SMALL)))
        assert await asyncio.get_running_loop().run_in_executor(None, device.held.wait, 30)
        with pytest.raises(ServiceError) as full:  # a new id competes for a place, and there is none
            await second.run(ImageRequest(prompt="b", request_id="new-one", **SMALL))
        again = await second.run(request)
        device.release()
        await busy
        return full.value, again

    full, again = asyncio.run(scenario())
    assert full.code == "queue_full" and again.answer == answer
    second.shutdown()


class StoreThatGoesDown(LocalFolderStore):
    down = False

    def get(self, name):
        if self.down:
            raise StoreError("the bucket stopped answering")
        return super().get(name)


def test_an_image_read_back_is_503_while_the_store_is_down_and_410_once_it_is_gone(tiny, tmp_path):
    folder, images = tmp_path / "records", StoreThatGoesDown(tmp_path / "images")
    first = ready(make_engine(tiny, images, tmp_path, ledger=ledger_in(folder, "one")))
    request = ImageRequest(prompt="a", request_id="read-back", **SMALL)
    [image] = asyncio.run(first.run(request)).answer.images
    first.shutdown()
    second = ready(make_engine(tiny, images, tmp_path, ledger=ledger_in(folder, "two")))

    async def read_back():
        finished = await second.run(request)  # answered from the record: no files, they are read from the store
        try:
            return await second.image_bytes(finished)
        except ServiceError as exc:
            return exc

    [data] = asyncio.run(read_back())
    assert hashlib.sha256(data).hexdigest() == image.sha256
    images.down = True
    down = asyncio.run(read_back())
    assert (down.status, down.code, down.retry_after) == (503, "store_unavailable", 10)
    images.down = False
    (tmp_path / "images" / image.object_name).unlink()  # a lifecycle rule removed it
    gone = asyncio.run(read_back())
    assert (gone.status, gone.code) == (410, "image_gone") and "'read-back'" in gone.message
    second.shutdown()


def test_answers_held_during_an_outage_keep_no_image_data_and_repeats_still_get_it(tiny, tmp_path):
    store = GatedStore(tmp_path / "images", gated_request="never-gated")
    store.fail = True
    engine = ready(make_engine(tiny, store, tmp_path))
    ids = [f"outage-{n}" for n in range(3)]
    firsts = [asyncio.run(engine.run(ImageRequest(prompt=str(n), request_id=rid, **SMALL))).answer.images[0]
              for n, rid in enumerate(ids)]
    assert all(first.stored is False and first.data for first in firsts)  # the callers got them inline
    held = [engine.lifecycle.book.get(rid).answer for rid in ids]
    assert sum(len(image.data or "") for answer in held for image in answer.images) == 0  # memory: none of it
    for rid, first in zip(ids, firsts):
        [again] = asyncio.run(engine.run(ImageRequest(prompt=rid[-1], request_id=rid, **SMALL))).answer.images
        assert again.stored is False and hashlib.sha256(base64.b64decode(again.data)).hexdigest() == first.sha256
    engine.shutdown()


def test_retry_after_scales_with_the_steps_and_pixels_of_the_generations_ahead(tiny, tmp_path):
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path), tmp_path, max_queue=0))
    device = hold_device(engine)

    async def refused_behind(ahead: ImageRequest) -> int:
        device.held.clear()
        device.gate.clear()
        running = asyncio.ensure_future(engine.run(ahead))
        assert await asyncio.get_running_loop().run_in_executor(None, device.held.wait, 30)
        with pytest.raises(ServiceError) as full:
            await engine.run(ImageRequest(prompt="next", **SMALL))
        device.release(abort=True)  # the held one need not cost a real generation
        with pytest.raises(RuntimeError):
            await running
        return full.value.retry_after

    async def scenario():
        large = await refused_behind(ImageRequest(prompt="hold large", width=1024, height=1024,
                                                  num_inference_steps=40))
        small = await refused_behind(ImageRequest(prompt="hold small", width=256, height=256, num_inference_steps=2))
        return large, small

    large, small = asyncio.run(scenario())
    # Seeded by the warm-up's time per step (2 steps at 1024²): 40 steps at 1024² are 20 warm-ups, 2 at 256² a 16th.
    assert large > small >= 1, (large, small)
    engine.shutdown()


class RecordsDownAtFirst(LocalRecords):
    """Local records whose calls fail (a store outage) until the test sets `down` to False."""

    down = True

    def create_record(self, name, data):
        if self.down:
            raise StoreError("the bucket stopped answering")
        return super().create_record(name, data)


def test_a_request_served_during_an_outage_is_claimed_once_the_store_is_back_while_it_still_runs(tiny, tmp_path):
    records = RecordsDownAtFirst(tmp_path / "records")
    engine = ready(make_engine(tiny, LocalFolderStore(tmp_path / "images"), tmp_path,
                               ledger=ledger_in(None, lease_seconds=1.5, records=records)))
    engine.lifecycle.pause_seconds = 0.5  # after a failed claim, the ledger is skipped this long
    device = hold_device(engine)

    async def scenario():
        assert isinstance(await engine.run(ImageRequest(prompt="hold", request_id="late", wait=False, **SMALL)),
                          Pending)
        assert await asyncio.get_running_loop().run_in_executor(None, device.held.wait, 30)
        records.down = False  # the store is back, the request still runs
        for _ in range(300):  # a hang guard, not a time bound
            found = records.read_record("sd3/requests/late.json")
            if found is not None:
                break
            await asyncio.sleep(0.1)
        device.release()
        while isinstance(await engine.poll("late"), Pending):
            await asyncio.sleep(0.05)
        return found

    found = asyncio.run(scenario())
    assert found is not None, "no record until the answer"
    claimed = json.loads(found[0])
    assert claimed["state"] in ("queued", "running") and claimed["owner"] == "me"  # seen by others while it ran
    assert json.loads(records.read_record("sd3/requests/late.json")[0])["state"] == "done"
    engine.shutdown()
