"""The request ledger's parts: conditional records in Object Storage (the loopback fake, the real SDK) and in a
local folder shared by several processes; what a record keeps and how a reused id is told apart."""

from __future__ import annotations

import multiprocessing
import time

import oci
import pytest

from sd3_service.api.native.models import PredictRequest, to_image_request
from sd3_service.jobs.ledger import Ledger, differing_fields, digest, recorded_parameters, seed_for
from sd3_service.storage.records import LocalRecords, RecordChanged, RecordExists
from sd3_service.storage.store import ImageObject

# -- the fake honours conditional requests as OCI does ---------------------------------------------------------


def test_the_fake_answers_412_to_a_failed_condition_and_keeps_the_object(fake, bucket):
    client = bucket.client()
    first = client.put_object("tenancyns", "images", "r.json", b"one", if_none_match="*")
    with pytest.raises(oci.exceptions.ServiceError) as again:
        client.put_object("tenancyns", "images", "r.json", b"two", if_none_match="*")
    assert (again.value.status, again.value.code) == (412, "IfNoneMatchFailed")
    with pytest.raises(oci.exceptions.ServiceError) as stale:
        client.put_object("tenancyns", "images", "r.json", b"three", if_match="not-the-etag")
    assert (stale.value.status, stale.value.code) == (412, "IfMatchFailed")
    assert fake.object("images", "r.json").data == b"one"
    second = client.put_object("tenancyns", "images", "r.json", b"four", if_match=first.headers["etag"])
    assert fake.object("images", "r.json").data == b"four" and second.headers["etag"] != first.headers["etag"]
    with pytest.raises(oci.exceptions.ServiceError) as gone:
        client.delete_object("tenancyns", "images", "r.json", if_match=first.headers["etag"])
    assert gone.value.status == 412 and fake.object("images", "r.json") is not None


# -- records in a bucket ------------------------------------------------------------------------------------


def test_bucket_records_are_created_once_and_replaced_only_unchanged(fake, bucket):
    etag = bucket.create_record("sd3/requests/a.json", b'{"v": 1}')
    with pytest.raises(RecordExists):
        bucket.create_record("sd3/requests/a.json", b'{"v": 2}')
    assert bucket.read_record("sd3/requests/a.json") == (b'{"v": 1}', etag)
    newer = bucket.replace_record("sd3/requests/a.json", b'{"v": 3}', etag)
    with pytest.raises(RecordChanged):
        bucket.replace_record("sd3/requests/a.json", b'{"v": 4}', etag)
    assert bucket.read_record("sd3/requests/a.json") == (b'{"v": 3}', newer)
    assert bucket.read_record("sd3/requests/missing.json") is None
    # What the SDK sent: the conditions as headers, every call signed (the fake verified each signature).
    puts = fake.seen("PUT", "requests")
    assert [r.headers.get("if-none-match") for r in puts] == ["*", "*", None, None]
    assert [r.headers.get("if-match") for r in puts] == [None, None, etag, etag]
    assert all(r.key_id for r in fake.seen(path_contains="requests"))


def test_an_image_put_only_if_absent_keeps_what_is_there(fake, bucket):
    bucket.put(ImageObject(name="sd3/requests/b.json", data=b"first", content_type="application/json",
                           if_absent=True))
    bucket.put(ImageObject(name="sd3/requests/b.json", data=b"second", content_type="application/json",
                           if_absent=True))  # 412: no error, and nothing overwritten
    assert fake.object("images", "sd3/requests/b.json").data == b"first"


# -- records in a local folder, shared by processes -----------------------------------------------------------


def _race_to_create(folder: str, worker: int, start: float, results) -> None:
    while time.time() < start:
        pass
    try:
        LocalRecords(folder).create_record("sd3/requests/raced.json", f"worker {worker}".encode())
        results.put(worker)
    except RecordExists:
        results.put(None)


def test_of_many_processes_creating_one_local_record_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = time.time() + 3
    workers = [context.Process(target=_race_to_create, args=(str(tmp_path), n, start, results)) for n in range(6)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for process in workers:
        process.join(60)
    winners = [n for n in outcomes if n is not None]
    assert len(winners) == 1
    assert (tmp_path / "sd3/requests/raced.json").read_bytes() == f"worker {winners[0]}".encode()


def test_local_records_replace_only_what_was_read(tmp_path):
    records = LocalRecords(tmp_path)
    etag = records.create_record("r.json", b"one")
    newer = records.replace_record("r.json", b"two", etag)
    with pytest.raises(RecordChanged):
        records.replace_record("r.json", b"three", etag)
    assert records.read_record("r.json") == (b"two", newer)


def sent(**fields):
    """A request as the engine gets it from `/predict`."""
    return to_image_request(PredictRequest(**fields))


# -- what a record keeps, and a reused id -------------------------------------------------------------------------


def test_a_record_keeps_digests_of_the_prompt_and_inputs_unless_text_is_allowed():
    request = sent(prompt="a secret plan", image="AAAA", mask_image="oci://in@ns/m.png")
    hidden = recorded_parameters(request, keep_text=False)
    assert hidden["prompt"] == digest("a secret plan") and hidden["image"] == digest("AAAA")
    assert hidden["mask_image"] == "oci://in@ns/m.png" and "wait" not in hidden and "request_id" not in hidden
    assert recorded_parameters(request, keep_text=True)["prompt"] == "a secret plan"
    assert "strength" not in recorded_parameters(sent(prompt="x"), keep_text=False)


def test_a_reused_id_is_told_by_every_field_that_differs():
    first = recorded_parameters(sent(prompt="a fox", width=512), keep_text=False)
    same = recorded_parameters(sent(prompt="a fox", width=512, wait=False), keep_text=False)
    other = recorded_parameters(sent(prompt="a cat", width=768), keep_text=True)
    assert differing_fields(first, same, recorded_seed=7) == []
    assert differing_fields(first, other, recorded_seed=7) == ["prompt", "width"]
    with_seed = recorded_parameters(sent(prompt="a fox", width=512, seed=7), keep_text=False)
    assert differing_fields(first, with_seed, recorded_seed=7) == []  # the seed its answer gave
    assert differing_fields(first, with_seed, recorded_seed=8) == ["seed"]


def test_without_a_seed_the_id_chooses_it():
    request = sent(prompt="x")
    assert seed_for(request, "abc") == seed_for(request, "abc") != seed_for(request, "abd")
    assert seed_for(sent(prompt="x", seed=5), "abc") == 5


def test_a_claim_whose_answer_was_lost_is_still_this_processes(tmp_path):
    ledger = Ledger(LocalRecords(tmp_path), "sd3/", lease_seconds=30, owner="me")
    record = ledger.new_record("r1", seed=1, parameters={}, day="2026/12/01")
    assert ledger.claim(record).mine
    assert ledger.claim(record).mine  # the retry of a create that had succeeded
    other = Ledger(LocalRecords(tmp_path), "sd3/", lease_seconds=30, owner="you")
    claim = other.claim(other.new_record("r1", seed=2, parameters={}, day="2026/12/01"))
    assert not claim.mine and claim.record.owner == "me" and claim.record.seed == 1
