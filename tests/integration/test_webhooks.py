"""Webhooks, as a caller's receiver sees them: a loopback receiver verifies every delivery with the
`standardwebhooks` package; servers are real, and one is killed (SIGKILL) while a delivery is failing."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import uuid

import psutil
import pytest

from testbed.server import start_server, stop_server
from testbed.waiting import wait_until
from testbed.webhook_receiver import Answer, WebhookReceiver

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
SMALL = {"width": 256, "height": 256, "num_inference_steps": 2, "seed": 5}
# A receiver on loopback needs both: plain http, and a loopback address
PERMISSIVE = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_HOSTS": "127.0.0.1", "WEBHOOK_ALLOW_HTTP": "true",
              "WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_RETRY_SECONDS": "60", "LOG_FORMAT": "json"}


@pytest.fixture(scope="module")
def receiver():
    made = WebhookReceiver(SECRET)
    yield made
    made.close()


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    """A server that sends webhooks to the loopback receiver."""
    running = start_server(tmp_path_factory.mktemp("hooks"), PERMISSIVE, gates=True)
    yield running
    stop_server(running)


def post(server, body):
    with server.client() as client:
        return client.post("/predict", json=body)


def test_start_then_completed_each_signed_with_the_poll_answer(hooks, receiver):
    path = f"/events/{uuid.uuid4().hex[:8]}"
    answer = post(hooks, {"prompt": "a kite", **SMALL, "webhook": receiver.url(path),
                          "webhook_events_filter": ["start", "completed"]})
    assert answer.status_code == 200, answer.text
    started, completed = receiver.wait_for(path, 2)
    assert started.verified is not None and completed.verified is not None  # signatures check out
    assert (started.verified["type"], completed.verified["type"]) == ("image.started", "image.completed")
    assert started.verified["data"]["status"] == "running"
    polled = post(hooks, {"request_id": answer.json()["request_id"]}).json()
    assert completed.verified["data"] == polled == answer.json()
    assert started.headers["webhook-id"] != completed.headers["webhook-id"]


def test_the_docs_receiver_verifies_a_delivery_as_written(hooks, receiver):
    import re
    from pathlib import Path

    from standardwebhooks.webhooks import WebhookVerificationError

    text = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S)[1].replace("whsec_…", SECRET)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the docs' own lines, as a receiver would paste them
    path = f"/docs/{uuid.uuid4().hex[:8]}"
    assert post(hooks, {"prompt": "a kite", **SMALL, "webhook": receiver.url(path)}).status_code == 200
    [call] = receiver.wait_for(path, 1)
    assert scope["receive"](call.body, call.headers)["type"] == "image.completed"
    with pytest.raises(WebhookVerificationError):
        scope["receive"](call.body.replace(b"image.completed", b"image.failed"), call.headers)


def test_a_failed_request_sends_its_error(hooks, receiver):
    path = f"/failed/{uuid.uuid4().hex[:8]}"
    not_an_image = base64.b64encode(b"no image here").decode()
    answer = post(hooks, {"prompt": "a kite", **SMALL, "image": not_an_image, "webhook": receiver.url(path)})
    assert answer.status_code == 400
    [failed] = receiver.wait_for(path, 1)
    assert failed.verified["type"] == "image.failed" and failed.verified["data"]["error"]["field"] == "image"


def test_a_failing_receiver_gets_the_same_webhook_id_until_it_accepts(hooks, receiver):
    path = f"/flaky/{uuid.uuid4().hex[:8]}"
    receiver.script(path, Answer(503), Answer(500, {"retry-after": "1"}), Answer(200))
    assert post(hooks, {"prompt": "a kite", **SMALL, "webhook": receiver.url(path)}).status_code == 200
    calls = receiver.wait_for(path, 3)
    assert [call.status for call in calls] == [503, 500, 200]
    assert len({call.headers["webhook-id"] for call in calls}) == 1 and all(call.verified for call in calls)
    request_id = calls[0].verified["data"]["request_id"]

    def logged(key: str) -> list[dict]:
        return [line for line in map(json.loads, filter(lambda text: text.startswith("{"), hooks.log().splitlines()))
                if line.get("request_id") == request_id and key in line]

    wait_until(lambda: logged("outcome"))  # the sender logs its outcome after the receiver answered
    attempts = logged("attempt")
    assert [(line["attempt"], line["status"], line["host"]) for line in attempts] == [
        (1, 503, "127.0.0.1"), (2, 500, "127.0.0.1"), (3, 200, "127.0.0.1")]  # one JSON line each, host only


def test_410_gone_ends_it_at_once(hooks, receiver):
    path = f"/gone/{uuid.uuid4().hex[:8]}"
    receiver.script(path, Answer(410))
    request_id = f"gone-{uuid.uuid4().hex[:6]}"
    assert post(hooks, {"prompt": "a kite", **SMALL, "webhook": receiver.url(path),
                        "request_id": request_id}).status_code == 200
    receiver.wait_for(path, 1)
    record = hooks.image_dir / "sd3" / "requests" / f"{request_id}.json"
    # the record says how it ended once the sender settled it: no second call comes
    wait_until(lambda: record.exists() and json.loads(record.read_text())["webhooks"][0]["state"] == "gone")
    assert len(receiver.at(path)) == 1


def test_a_slow_receiver_does_not_delay_the_answer_or_the_next_request(hooks, receiver):
    path = f"/slow/{uuid.uuid4().hex[:8]}"
    held = threading.Event()
    receiver.script(path, Answer(200, hold=held))
    try:
        first = post(hooks, {"prompt": "a kite", **SMALL, "webhook": receiver.url(path)})
        second = post(hooks, {"prompt": "a second kite", **SMALL})
        assert first.status_code == 200 and second.status_code == 200  # answered while the receiver still holds
        assert receiver.at(path) == []  # the delivery has not been answered yet
    finally:
        held.set()
    receiver.wait_for(path, 1)


def test_a_delivery_pending_when_the_server_is_killed_is_sent_by_the_restarted_one(receiver, tmp_path):
    path = f"/killed/{uuid.uuid4().hex[:8]}"
    receiver.script(path, *[Answer(503)] * 1000)  # failing until the test says otherwise
    first = start_server(tmp_path / "victim", PERMISSIVE)
    try:
        assert post(first, {"prompt": "a kite", **SMALL, "webhook": receiver.url(path)}).status_code == 200
        failing = receiver.wait_for(path, 2)  # it is being retried
        tree = psutil.Process(first.process.pid)
        for process in [*tree.children(recursive=True), tree]:  # server and worker, no goodbye
            process.kill()
        psutil.wait_procs([*tree.children(recursive=True), tree], timeout=30)
    finally:
        stop_server(first)
    receiver.script(path, Answer(200))
    before = len(receiver.at(path))
    restarted = start_server(tmp_path / "victim", PERMISSIVE)  # the same folders: its spool holds the event
    try:
        calls = receiver.wait_for(path, before + 1)
        assert calls[-1].status == 200 and calls[-1].verified is not None
        assert calls[-1].headers["webhook-id"] == failing[0].headers["webhook-id"]
    finally:
        stop_server(restarted)


REFUSED = {
    "another host": ("https://elsewhere.example.org/hook", "not one webhooks may go to"),
    "plain http": ("http://hooks.example.com/hook", "https"),
    "a loopback address": ("https://localhost/hook", "loopback"),
    "the instance metadata address": ("https://169.254.169.254/opc/v2/instance/", "link-local"),
    "a private address": ("https://10.0.0.8/hook", "private"),
    "not a URL": ("hooks.example.com/hook", "absolute"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_webhook_that_could_reach_inside_is_refused_before_any_work(server, case):
    # `server` allows hooks.example.com, localhost and the addresses above, over https, and no private address
    url, said = REFUSED[case]
    request_id = uuid.uuid4().hex
    refused = post(server, {"prompt": "a kite", **SMALL, "webhook": url, "request_id": request_id})
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "webhook", refused.text
    assert said in refused.json()["error"]["message"]
    assert not (server.image_dir / "sd3" / "requests" / f"{request_id}.json").exists()  # no work: not even a record
    assert url.split("/", 3)[-1] not in server.log()  # the log names no path (it may hold a token)


def test_a_deployment_without_a_secret_says_what_to_set(pool):
    refused = post(pool, {"prompt": "a kite", **SMALL, "webhook": "https://hooks.example.com/hook"})
    assert refused.status_code == 400 and "WEBHOOK_SECRET" in refused.json()["error"]["message"]


def test_reusing_an_id_with_another_webhook_is_a_conflict_on_that_field(hooks, receiver):
    request_id = f"reused-{uuid.uuid4().hex[:6]}"
    body = {"prompt": "a kite", **SMALL, "request_id": request_id, "webhook": receiver.url("/reused/a")}
    assert post(hooks, body).status_code == 200
    other = post(hooks, {**body, "webhook": receiver.url("/reused/b")})
    assert other.status_code == 409 and "webhook" in other.json()["error"]["message"], other.text


def test_the_secret_comes_from_vault_read_with_the_services_own_credentials(receiver, tmp_path):
    from testbed.fakes import oci_common
    from testbed.fakes.secrets import FakeSecrets

    secret_id = "ocid1.vaultsecret.oc1.iad.aaaawebhooksecret"
    with FakeSecrets() as vault:
        vault.add_secret(secret_id, SECRET)  # the receiver verifies with this one
        principal = vault.trust(oci_common.resource_principal(tmp_path / "rp"))
        env = {**{name: value for name, value in PERMISSIVE.items() if name != "WEBHOOK_SECRET"}, **principal.env,
               "WEBHOOK_SECRET_OCID": secret_id, "OCI_SECRETS_ENDPOINT": vault.endpoint}
        server = start_server(tmp_path / "vaulted", env)
        try:
            path = f"/vaulted/{uuid.uuid4().hex[:8]}"
            assert post(server, {"prompt": "a kite", **SMALL, "webhook": receiver.url(path)}).status_code == 200
            [delivered] = receiver.wait_for(path, 1)
            assert delivered.verified is not None  # signed with the Vault's secret
            [read] = vault.seen("GET", f"/secretbundles/{secret_id}")
            assert read.key_id == principal.key_id and read.status == 200  # as the deployment, signature checked
            assert SECRET not in server.log()
        finally:
            stop_server(server)


def test_another_instance_that_reads_the_record_sends_what_a_dead_one_held(receiver, tmp_path):
    # Two instances on one set of records (the local store's folder); each has its own spool. A dies while its
    # receiver fails; B, asked for the request, finds the event no live sender holds and sends it.
    path = f"/adopted/{uuid.uuid4().hex[:8]}"
    receiver.script(path, *[Answer(503)] * 1000)
    shared = {**PERMISSIVE, "IMAGE_DIR": str(tmp_path / "records"), "LEASE_SECONDS": "3"}
    a = start_server(tmp_path / "a", shared)
    b = start_server(tmp_path / "b", shared)
    try:
        request_id = f"adopted-{uuid.uuid4().hex[:6]}"
        assert post(a, {"prompt": "a kite", **SMALL, "webhook": receiver.url(path),
                        "request_id": request_id}).status_code == 200
        failing = receiver.wait_for(path, 1)
        tree = psutil.Process(a.process.pid)
        for process in [*tree.children(recursive=True), tree]:
            process.kill()
        psutil.wait_procs([*tree.children(recursive=True), tree], timeout=30)
        receiver.script(path, Answer(200))
        before = len(receiver.at(path))
        # polls read the record; once the dead sender's hold ran out, one of them adopts the event
        wait_until(lambda: post(b, {"request_id": request_id}).status_code == 200
                   and len(receiver.at(path)) > before, timeout=120, every=0.5)
        adopted = receiver.at(path)[-1]
        assert adopted.status == 200 and adopted.headers["webhook-id"] == failing[0].headers["webhook-id"]
        assert f"[{request_id}] Adopting its webhook event" in b.log()
    finally:
        stop_server(a)
        stop_server(b)
