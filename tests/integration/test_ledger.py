"""One answer per request id across instances, kills and restarts: two real servers on one loopback bucket.

Every server here is `bentoml serve` with the tiny model, storing in the Object Storage fake (which checks
every signature and honours `if-none-match` / `if-match` as OCI does), with a short lease so that a takeover
happens within a test.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import psutil
import pytest

from integration.test_metrics import scrape, value
from integration.test_service import oci_raw_request
from testbed.fakes import oci_common
from testbed.fakes.object_storage import FakeObjectStorage
from testbed.server import start_server, stop_server
from testbed.waiting import wait_until

SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}

pytestmark = pytest.mark.usefixtures("healthy_fake")  # every test starts and ends with no fault injected


@pytest.fixture(scope="module")
def fake():
    with FakeObjectStorage(namespace="tenancyns", buckets=("images",)) as server:
        yield server


@pytest.fixture(scope="module")
def principal(fake, tmp_path_factory):
    return fake.trust(oci_common.resource_principal(tmp_path_factory.mktemp("rp")))


def env_for(fake, principal, tmp, **extra) -> dict[str, str]:
    return {**principal.env, "BUCKET_NAME": "images", "OCI_OBJECT_STORAGE_ENDPOINT": fake.endpoint,
            "SPOOL_DIR": str(tmp / "spool"), "STORE_TIMEOUT_SECONDS": "4", "LEASE_SECONDS": "3",
            "SYNC_WAIT_SECONDS": "3", "LEDGER_PAUSE_SECONDS": "1", **extra}


@pytest.fixture(scope="module")
def pair(fake, principal, tmp_path_factory):
    """Two instances of one deployment: the same bucket, each its own spool."""
    servers = []
    try:
        for name in ("a", "b"):
            tmp = tmp_path_factory.mktemp(f"instance-{name}")
            servers.append(start_server(tmp, env_for(fake, principal, tmp), gates=True))
        yield servers
    finally:
        for server in servers:
            stop_server(server)


def post(server, body, timeout: float = 120) -> httpx.Response:
    with server.client(timeout=timeout) as client:
        return client.post("/predict", json=body)


def generations(server, request_id: str) -> int:
    return server.log().count(f"[{request_id}] Generating on")


def until_answered(server, request_id: str, timeout: float = 120) -> dict:
    """Poll by id until the answer comes (a hang guard, not a time bound on the service)."""
    deadline = time.monotonic() + timeout
    while True:
        response = post(server, {"request_id": request_id})
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
        assert time.monotonic() < deadline, "never answered"
        time.sleep(0.3)


def record(fake, request_id: str) -> dict | None:
    stored = fake.object("images", f"sd3/requests/{request_id}.json")
    return None if stored is None else json.loads(stored.data)


def test_the_same_id_sent_to_a_then_b_gets_as_answer_and_b_generates_nothing(pair, fake):
    a, b = pair
    body = {"prompt": "a red fox", "request_id": "fox-then", **SMALL}
    first = post(a, body)
    second = post(b, body)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert second.json() == first.json()
    assert (generations(a, "fox-then"), generations(b, "fox-then")) == (1, 0)
    assert record(fake, "fox-then")["state"] == "done"
    # Polled on either instance, by id alone: the same answer.
    assert post(b, {"request_id": "fox-then"}).json() == first.json()


def test_the_same_id_sent_to_both_at_once_generates_once(pair):
    a, b = pair
    body = {"prompt": "two foxes", "request_id": "fox-at-once", **SMALL, "num_inference_steps": 8}
    answers = {}
    threads = [threading.Thread(target=lambda s=s: answers.__setitem__(s.url, post(s, body))) for s in pair]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [answers[s.url].status_code for s in pair] == [200, 200], [answers[s.url].text for s in pair]
    assert answers[a.url].json() == answers[b.url].json()
    assert generations(a, "fox-at-once") + generations(b, "fox-at-once") == 1


def test_the_same_id_with_other_parameters_on_another_instance_is_409(pair):
    a, b = pair
    assert post(a, {"prompt": "a heron", "request_id": "heron", **SMALL}).status_code == 200
    reused = post(b, {"prompt": "a heron", "request_id": "heron", **SMALL, "num_images": 2})
    assert reused.status_code == 409 and reused.json()["error"]["field"] == "num_images", reused.text
    assert generations(b, "heron") == 0


def test_an_async_request_is_polled_on_the_other_instance_from_its_record(pair, fake):
    a, b = pair
    accepted = post(a, {"prompt": a.hold("heron-async"), "request_id": "heron-async", "wait": False, **SMALL})
    assert accepted.status_code == 202 and accepted.json()["status"] in ("queued", "running"), accepted.text
    assert int(accepted.headers["retry-after"]) >= 1
    a.wait_held("heron-async")
    elsewhere = post(b, {"request_id": "heron-async"})
    assert elsewhere.status_code == 202, elsewhere.text
    assert elsewhere.json()["progress"] is None and elsewhere.json()["position"] is None  # only A knows those
    a.release("heron-async")
    answer = until_answered(b, "heron-async")
    assert answer == until_answered(a, "heron-async")
    assert generations(b, "heron-async") == 0


def test_a_sync_request_past_sync_wait_answers_202_and_then_completes(pair):
    a, _ = pair
    try:
        held_back = post(a, {"prompt": a.hold("long-exposure"), "request_id": "long-exposure", **SMALL})
    finally:
        a.release("long-exposure")
    assert held_back.status_code == 202 and held_back.json()["request_id"] == "long-exposure", held_back.text
    answer = until_answered(a, "long-exposure")
    assert answer["images"][0]["stored"] is True


def test_oci_raw_request_sends_async_and_polls(pair, tmp_path):
    a, _ = pair
    sent = oci_raw_request(f"{a.url}/predict", {"prompt": a.hold("kite-cli"), "request_id": "kite-cli",
                                                "wait": False, **SMALL}, tmp_path)
    assert sent["status"].startswith("202"), sent
    assert sent["data"]["request_id"] == "kite-cli"
    a.release("kite-cli")
    until_answered(a, "kite-cli")
    polled = oci_raw_request(f"{a.url}/predict", {"request_id": "kite-cli"}, tmp_path)
    assert polled["status"].startswith("200") and polled["data"]["request_id"] == "kite-cli", polled


def test_unknown_ids_and_bad_poll_bodies(pair):
    a, _ = pair
    unknown = post(a, {"request_id": "never-sent"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_request"
    not_a_poll = post(a, {"request_id": "never-sent", "wait": False})
    assert not_a_poll.status_code == 400 and not_a_poll.json()["error"]["field"] == "prompt", not_a_poll.text
    malformed = post(a, {"request_id": "../../etc/passwd"})
    assert malformed.status_code == 400 and malformed.json()["error"]["field"] == "request_id", malformed.text


def test_a_killed_owner_is_taken_over_after_its_lease_and_a_restart_answers_the_same(fake, principal, pair,
                                                                                    tmp_path):
    _, b = pair
    victim = start_server(tmp_path / "victim", env_for(fake, principal, tmp_path / "victim"), gates=True)
    body = {"prompt": victim.hold("storm", "a storm at sea"), "request_id": "storm", **SMALL}
    try:
        accepted = post(victim, {**body, "wait": False})
        assert accepted.status_code == 202, accepted.text
        victim.wait_held("storm")
        # Mid-generation: no renewal, no answer, no goodbye. BentoML's worker runs in a session of its own, so the
        # whole tree is killed, worker first.
        tree = psutil.Process(victim.process.pid)
        for process in [*tree.children(recursive=True), tree]:
            process.kill()
        psutil.wait_procs([*tree.children(recursive=True), tree], timeout=30)
        victim.process.wait(30)
        claimed = record(fake, "storm")
        assert claimed["state"] in ("queued", "running") and claimed["answer"] is None

        b.hold("storm"), b.release("storm")  # B's own gate for this prompt: open
        first = post(b, body)  # waits for the dead owner's lease, takes over, generates
        answer = first.json() if first.status_code == 200 else until_answered(b, "storm")
        assert generations(b, "storm") == 1, (first.text, [l for l in b.log().splitlines() if "storm" in l][-8:])
        assert answer["seed"] == claimed["seed"]  # the recorded seed: the same image the owner would have made
        [image] = answer["images"]
        stored = fake.object("images", image["object_name"])
        assert hashlib.sha256(stored.data).hexdigest() == image["sha256"]
        assert image["object_name"].startswith(f"sd3/{claimed['day']}/storm-")
        etag = stored.etag
        assert value(scrape(b), "sd3_takeovers_total") == 1
    finally:
        stop_server(victim)

    restarted = start_server(tmp_path / "victim", env_for(fake, principal, tmp_path / "victim"))
    try:
        again = post(restarted, body)
        assert again.status_code == 200 and again.json() == answer, again.text
        assert generations(restarted, "storm") == 0
        assert fake.object("images", image["object_name"]).etag == etag  # not written again
    finally:
        stop_server(restarted)


# -- the store down: nothing that succeeds without the ledger fails with it ----------------------------------


@pytest.fixture(scope="module")
def lone(fake, principal, tmp_path_factory):
    """A server of its own for the outages (a failed claim pauses its ledger for a second), waiting long enough to
    answer at once."""
    tmp = tmp_path_factory.mktemp("lone")
    server = start_server(tmp, env_for(fake, principal, tmp, SYNC_WAIT_SECONDS="60"), gates=True)
    yield server
    stop_server(server)


def is_record_call(request) -> bool:
    return "requests%2F" in request.path  # the SDK quotes the slashes of an object name


def test_an_outage_during_the_claim_serves_the_request_and_records_it_later(fake, lone):
    fake.outage(503, when=is_record_call)
    answer = post(lone, {"prompt": "a lantern", "request_id": "lantern", **SMALL})
    assert answer.status_code == 200 and answer.json()["images"][0]["stored"] is True, answer.text
    assert record(fake, "lantern") is None and "[lantern] Cannot claim the request in the ledger" in lone.log()
    fake.restore()
    wait_until(lambda: record(fake, "lantern") is not None)
    assert record(fake, "lantern")["state"] == "done"
    assert record(fake, "lantern")["answer"]["images"] == answer.json()["images"]


def test_an_outage_during_generation_loses_no_image_and_no_record(fake, lone):
    body = {"prompt": lone.hold("fog", "a lighthouse in fog"), "request_id": "fog", **SMALL}
    replies = []
    caller = threading.Thread(target=lambda: replies.append(post(lone, body)))
    caller.start()
    lone.wait_held("fog")
    fake.outage(503)
    lone.release("fog")
    caller.join(120)
    [reply] = replies
    assert reply.status_code == 200, reply.text
    [image] = reply.json()["images"]
    assert image["stored"] is False and image["data"]  # inline, kept in the spool
    fake.restore()
    wait_until(lambda: fake.object("images", image["object_name"]) is not None and record(fake, "fog") is not None
               and record(fake, "fog")["state"] == "done")
    assert hashlib.sha256(fake.object("images", image["object_name"]).data).hexdigest() == image["sha256"]


def test_an_outage_for_the_final_record_still_answers_and_records_it(fake, lone):
    fake.outage(503, when=lambda request: is_record_call(request) and "if-match" in request.headers)
    answer = post(lone, {"prompt": "a quiet harbour", "request_id": "harbour", **SMALL})
    assert answer.status_code == 200, answer.text
    assert "[harbour] Cannot record the answer now" in lone.log()
    fake.restore()
    wait_until(lambda: (record(fake, "harbour") or {}).get("state") == "done")
    assert record(fake, "harbour")["answer"]["seed"] == answer.json()["seed"]
