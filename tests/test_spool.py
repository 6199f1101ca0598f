"""The spool: images the store could not take are kept on disk and uploaded later, never lost."""

from __future__ import annotations

import logging
import os
import time

import pytest
from pydantic import ValidationError

from sd3_service.settings import ARTIFACT_DIR, Settings
from sd3_service.storage.object_storage import ObjectStorageStore
from sd3_service.storage.spool import Spool, SpoolCorrupt, SpoolingStore
from sd3_service.storage.store import ImageObject, LocalFolderStore
from testbed.fakes import oci_common
from testbed.waiting import wait_until


def image(index: int = 0, request_id: str = "req-42") -> ImageObject:
    return ImageObject(name=f"sd3/2026/11/25/{request_id}-{index}.png", data=os.urandom(2048) + bytes([index]),
                       content_type="image/png", metadata={"seed": str(index), "model": "tiny"}, request_id=request_id)


SOMEWHERE = {"kind": "local", "folder": "/srv/images"}  # a destination, for tests of the folder alone


@pytest.fixture
def started():
    """Start SpoolingStores for a test and stop them after it."""
    running: list[SpoolingStore] = []

    def start(store, spool) -> SpoolingStore:
        spooling = SpoolingStore(store, spool, retry_min_seconds=0.05, retry_max_seconds=0.2)
        running.append(spooling)
        spooling.start()
        return spooling

    yield start
    for spooling in running:
        spooling.stop(timeout=10)


class BuggyStore(LocalFolderStore):
    """A real local store that raises a non-StoreError (a bug, or an SDK error nobody expected) while `broken`."""

    broken = True

    def put(self, image):
        if self.broken:
            raise KeyError("token")  # what a 200 without a token did inside the SDK's token renewal
        return super().put(image)


# -- the folder -------------------------------------------------------------------------------------


def test_a_kept_image_reads_back_the_same_from_a_new_process(tmp_path):
    kept = image()
    Spool(tmp_path / "spool").keep(kept, SOMEWHERE)

    after_restart = Spool(tmp_path / "spool")
    (path,) = after_restart.pending()
    assert after_restart.load(path).image == kept and after_restart.load(path).destination == SOMEWHERE
    assert not list((tmp_path / "spool").glob(".tmp-*"))  # written atomically, no leftovers


def test_keeping_the_same_name_again_replaces_it_and_order_is_oldest_first(tmp_path):
    spool = Spool(tmp_path)
    older, newer = image(0), image(1)
    spool.keep(older, SOMEWHERE)
    os.utime(spool.pending()[0], (1, 1))
    spool.keep(newer, SOMEWHERE)
    assert [spool.load(p).image.name for p in spool.pending()] == [older.name, newer.name]

    spool.keep(ImageObject(name=older.name, data=b"second try", content_type="image/png"), SOMEWHERE)

    assert len(spool) == 2 and {spool.load(p).image.data for p in spool.pending()} == {b"second try", newer.data}


def test_an_unreadable_spooled_file_is_set_aside_and_the_rest_still_uploads(tmp_path, caplog):
    spool = Spool(tmp_path / "spool")
    folder = LocalFolderStore(tmp_path / "images")
    bad = spool.keep(image(0), folder.destination())
    bad.write_bytes(bad.read_bytes()[:-10])  # truncated on disk
    intact = image(1)
    spool.keep(intact, folder.destination())

    assert SpoolingStore(folder, spool).upload_pending()

    assert (tmp_path / "images" / intact.name).read_bytes() == intact.data
    assert len(spool) == 0 and (spool.root / "corrupt" / bad.name).exists()
    assert "unreadable spooled file" in caplog.text


def test_half_written_files_from_a_crash_are_discarded_at_start(tmp_path, started):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / ".tmp-old").write_bytes(b"partial")
    os.utime(spool_dir / ".tmp-old", (time.time() - 3600,) * 2)
    (spool_dir / ".tmp-now").write_bytes(b"being written right now")

    started(LocalFolderStore(tmp_path / "images"), Spool(spool_dir))

    wait_until(lambda: not (spool_dir / ".tmp-old").exists())
    assert (spool_dir / ".tmp-now").exists()


def test_keeping_never_raises_even_when_the_disk_refuses(tmp_path, caplog):
    (tmp_path / "not-a-folder").write_text("a file where the spool folder should be")
    folder = BuggyStore(tmp_path / "images")
    spooling = SpoolingStore(folder, Spool(tmp_path / "not-a-folder" / "spool"))
    result = spooling.put(image())
    assert result.stored is False and result.location == folder.location(image().name)
    assert "[req-42] Could not spool" in caplog.text and "exists only in its response" in caplog.text


def test_the_spool_may_not_live_inside_the_read_only_artifact(monkeypatch):
    monkeypatch.setenv("SPOOL_DIR", str(ARTIFACT_DIR / "spool"))
    with pytest.raises(ValidationError, match="SPOOL_DIR must be outside the model artifact"):
        Settings()


# -- with Object Storage ----------------------------------------------------------------------------


def test_an_outage_keeps_the_image_and_uploads_it_under_the_same_name_when_the_bucket_is_back(
        fake, bucket, tmp_path, started):
    spooling = started(bucket, Spool(tmp_path / "spool"))
    wait_until(lambda: spooling.state == "ok")
    fake.outage(503)
    lost = image(0)

    assert spooling.put(lost).stored is False  # kept: the caller answers it inline

    assert len(spooling.spool) == 1 and fake.object("images", lost.name) is None
    about = spooling.describe()
    assert about["state"] == "failing" and about["spooled"] == 1 and "503" in about["error"]
    # While it is known to fail, requests do not each spend the retry budget on it.
    calls = len(fake.requests)
    assert spooling.put(image(1)).stored is False
    assert fake.seen("PUT", image(1).name) == [], "a known-down store was tried on the request path"
    time.sleep(0.5)  # the uploader keeps trying in the background meanwhile, and keeps the files
    assert len(fake.requests) > calls and len(spooling.spool) == 2

    fake.restore()

    wait_until(lambda: len(spooling.spool) == 0)
    stored = fake.object("images", lost.name)
    assert stored.data == lost.data and stored.metadata == lost.metadata and stored.content_type == "image/png"
    assert fake.object("images", image(1).name) is not None
    result = spooling.put(image(2))
    assert spooling.describe()["state"] == "ok" and result.stored and result.location.uri.endswith(image(2).name)


def test_a_restart_with_a_full_spool_finishes_the_uploads(fake, bucket, tmp_path, started, caplog):
    caplog.set_level(logging.INFO, logger="sd3")
    left_over = [image(i, request_id=f"req{i}") for i in range(3)]
    for kept in left_over:
        Spool(tmp_path / "spool").keep(kept, bucket.destination())  # a previous process spooled these, then stopped

    spooling = started(bucket, Spool(tmp_path / "spool"))

    wait_until(lambda: len(spooling.spool) == 0)
    assert {k.name: fake.object("images", k.name).data for k in left_over} == {k.name: k.data for k in left_over}
    assert "3 image(s) left in the spool" in caplog.text and "[req1] Stored spooled image" in caplog.text


def test_a_spooled_file_is_deleted_only_after_its_upload_succeeded(fake, bucket, tmp_path):
    spool = Spool(tmp_path / "spool")
    kept = image()
    spool.keep(kept, bucket.destination())
    spooling = SpoolingStore(bucket, spool)
    for outage in (500, None):  # an error answer, then connections dropped after the upload was sent
        fake.outage(outage, when=lambda r: r.method == "PUT")
        assert not spooling.upload_pending()
        assert len(spool) == 1
        fake.restore()
    assert spooling.upload_pending() and len(spool) == 0
    assert fake.object("images", kept.name).data == kept.data


def test_a_missing_credential_is_one_clear_line_at_start_and_images_are_kept(fake, tmp_path, started, caplog,
                                                                             monkeypatch):
    monkeypatch.delenv("OCI_RESOURCE_PRINCIPAL_VERSION", raising=False)
    store = ObjectStorageStore(bucket="images", endpoint=fake.endpoint)  # resource principal, outside OCI

    spooling = started(store, Spool(tmp_path / "spool"))
    wait_until(lambda: spooling.state == "failing")
    for index in range(3):
        assert spooling.put(image(index)).stored is False
    time.sleep(0.5)  # the uploader retries in the background meanwhile

    assert len(spooling.spool) == 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None  # one line, no traceback
    assert "OCI_RESOURCE_PRINCIPAL_VERSION is not defined" in errors[0].getMessage()
    assert "OCI_RESOURCE_PRINCIPAL_VERSION is not defined" in spooling.describe()["error"]
    assert fake.requests == []


def test_a_refused_credential_recovers_once_it_is_fixed(fake, tmp_path, started, monkeypatch):
    credentials = oci_common.resource_principal(tmp_path / "rp")  # not trusted yet: 401
    for name, value in credentials.env.items():
        monkeypatch.setenv(name, value)
    store = ObjectStorageStore(bucket="images", namespace="tenancyns", endpoint=fake.endpoint, timeout_seconds=3)
    spooling = started(store, Spool(tmp_path / "spool"))
    wait_until(lambda: spooling.state == "failing")
    assert "credential (OCI_AUTH=resource_principal) was refused" in spooling.describe()["error"]
    assert spooling.put(image()).stored is False

    fake.trust(credentials)  # e.g. the missing policy was added

    wait_until(lambda: len(spooling.spool) == 0)
    assert fake.object("images", image().name) is not None and spooling.state == "ok"


def test_a_stores_unexpected_error_neither_stops_the_uploader_nor_loses_the_image(tmp_path, caplog):
    folder = BuggyStore(tmp_path / "images")
    spooling = SpoolingStore(folder, Spool(tmp_path / "spool"), retry_min_seconds=0.05, retry_max_seconds=0.1)
    lost = image()
    assert spooling.put(lost).stored is False  # kept; the writer answers it inline
    assert spooling.state == "failing" and "KeyError" in spooling.error
    spooling.start()
    try:
        time.sleep(0.3)  # a few failed uploads
        assert spooling._thread.is_alive() and len(spooling.spool) == 1
        folder.broken = False
        wait_until(lambda: len(spooling.spool) == 0)
    finally:
        spooling.stop(5)
    assert (tmp_path / "images" / lost.name).read_bytes() == lost.data
    assert spooling.stored_later(lost.name).uri == folder.location(lost.name).uri
    assert "Uploading spooled" in caplog.text and "KeyError" in caplog.text


# -- destinations and several uploaders -------------------------------------------------------------


def test_a_spooled_image_goes_only_where_its_answer_said(tmp_path, started, caplog):
    spool = Spool(tmp_path / "spool")
    ours, theirs = LocalFolderStore(tmp_path / "ours"), LocalFolderStore(tmp_path / "theirs")
    mine, other = image(0, "mine"), image(0, "other")
    spool.keep(mine, ours.destination())
    held = spool.keep(other, theirs.destination())  # e.g. left by a server on another bucket sharing SPOOL_DIR

    spooling = started(ours, spool)
    wait_until(lambda: (tmp_path / "ours" / mine.name).exists())
    wait_until(lambda: "held_for_other_destinations" in spooling.describe())

    assert not (tmp_path / "ours" / other.name).exists() and not (tmp_path / "theirs").exists()
    assert held.exists() and spool.load(held).image == other
    [about] = spooling.describe()["held_for_other_destinations"]
    assert about["object_name"] == other.name and about["destination"] == theirs.destination()
    lines = [r for r in caplog.records if "was answered for" in r.getMessage()]
    assert len(lines) == 1 and "[other]" in lines[0].getMessage()
    # The store it was meant for takes it.
    assert SpoolingStore(theirs, spool).upload_pending()
    assert (tmp_path / "theirs" / other.name).read_bytes() == other.data and not held.exists()


def test_an_object_storage_namespace_not_known_yet_matches_but_another_bucket_does_not(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.keep(image(0), {"kind": "oci", "bucket": "images", "namespace": None})  # kept before the lookup
    spool.keep(image(1), {"kind": "oci", "bucket": "other", "namespace": None})

    class NamedBucket(LocalFolderStore):  # a real folder store that says it is bucket `images`
        def destination(self):
            return {"kind": "oci", "bucket": "images", "namespace": "tenancyns"}

    assert SpoolingStore(NamedBucket(tmp_path / "images"), spool).upload_pending()
    assert (tmp_path / "images" / image(0).name).exists() and not (tmp_path / "images" / image(1).name).exists()
    assert len(spool) == 1


def test_a_file_another_uploader_set_aside_first_does_not_stop_this_one(tmp_path):
    spool = Spool(tmp_path / "spool")
    folder = LocalFolderStore(tmp_path / "images")
    bad = spool.keep(image(0), folder.destination())
    bad.write_bytes(bad.read_bytes()[:-10])
    intact = image(1)
    spool.keep(intact, folder.destination())
    first = SpoolingStore(folder, spool)
    second = SpoolingStore(folder, Spool(spool.root))  # another worker on the same spool

    real_load = first.spool.load

    def load_while_the_other_worker_runs(path):
        # The interleaving that two workers can have: this one reads the bad file, then the other worker
        # sets it aside before this one does.
        try:
            return real_load(path)
        except SpoolCorrupt:
            assert second.upload_pending()
            raise

    first.spool.load = load_while_the_other_worker_runs
    assert first.upload_pending()  # before the fix: FileNotFoundError, and the upload thread died
    assert (spool.root / "corrupt" / bad.name).exists()
    assert (tmp_path / "images" / intact.name).read_bytes() == intact.data


def test_a_nudge_cuts_the_uploaders_backoff_short_once_the_store_answers_again(tmp_path):
    class Counting(BuggyStore):
        tries = 0

        def put(self, image):
            self.tries += 1
            return super().put(image)

    folder = Counting(tmp_path / "images")
    # A backoff of a minute: without the nudge, nothing would be retried within this test's guard.
    spooling = SpoolingStore(folder, Spool(tmp_path / "spool"), retry_min_seconds=60, retry_max_seconds=60)
    kept = image()
    assert spooling.put(kept).stored is False
    spooling.start()
    try:
        wait_until(lambda: folder.tries >= 2, timeout=20)  # the uploader tried once more, failed: in its backoff
        folder.broken = False  # the store is back; the ledger, say, has just seen it answer
        spooling.nudge()
        wait_until(lambda: len(spooling.spool) == 0, timeout=20)
    finally:
        spooling.stop(5)
    assert (tmp_path / "images" / kept.name).read_bytes() == kept.data
