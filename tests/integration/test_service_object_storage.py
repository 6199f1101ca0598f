"""The real service (`bentoml serve`) storing images in Object Storage: a loopback fake that checks every signature."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import time

import httpx
import pytest

from image_samples import b64, file_bytes, left_half_mask, noise
from integration.test_metrics import scrape, value
from sd3_service.storage.spool import Spool
from testbed.fakes import oci_common
from testbed.fakes.object_storage import FakeObjectStorage
from testbed.server import start_server, stop_server
from testbed.waiting import wait_until

SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}
PROMPT = "a red fox in fresh snow, morning light"

pytestmark = pytest.mark.usefixtures("healthy_fake")  # every test starts and ends with no fault injected


@pytest.fixture(scope="module")
def fake():
    with FakeObjectStorage(namespace="tenancyns", buckets=("images", "inputs", "private")) as server:
        yield server


@pytest.fixture(scope="module")
def principal(fake, tmp_path_factory):
    """The deployment's resource principal (v2.2 files, as Model Deployment mounts them), trusted by the fake."""
    return fake.trust(oci_common.resource_principal(tmp_path_factory.mktemp("rp")))


def bucket_env(fake, spool_dir, **extra) -> dict[str, str]:
    return {"BUCKET_NAME": "images", "OCI_OBJECT_STORAGE_ENDPOINT": fake.endpoint, "SPOOL_DIR": str(spool_dir),
            "STORE_TIMEOUT_SECONDS": "10", **extra}


@pytest.fixture(scope="module")
def server(fake, principal, tmp_path_factory, adapters):
    """One server writing to the fake bucket as the resource principal, with links, sidecars and a LoRA catalog."""
    tmp = tmp_path_factory.mktemp("oci-server")
    running = start_server(tmp, {**principal.env, **bucket_env(fake, tmp / "spool"), "RETURN_URL": "true",
                                 "URL_TTL_SECONDS": "600", "STORE_PARAMS": "true", "INPUT_BUCKETS": "images,inputs",
                                 "LORA_DIR": str(adapters.catalog), "LORA_CACHE_DIR": str(tmp / "lora-cache")})
    running.spool = Spool(tmp / "spool")
    yield running
    stop_server(running)


def predict(server, body) -> httpx.Response:
    with server.client() as client:
        return client.post("/predict", json=body)


def health_store(server) -> dict:
    with server.client() as client:
        return client.get("/health").json()["store"]


def test_every_image_is_stored_under_a_server_made_name_with_its_parameters(server, fake, principal):
    body = {"prompt": PROMPT, "seed": 7, "num_images": 2, **SMALL}
    answer = predict(server, body)
    assert answer.status_code == 200, answer.text
    request_id = answer.json()["request_id"]

    for index, image in enumerate(answer.json()["images"]):
        name = image["object_name"]
        day = re.fullmatch(rf"sd3/(\d{{4}}/\d\d/\d\d)/{request_id}-{index}\.png", name)
        assert day and abs(dt.datetime.strptime(day[1], "%Y/%m/%d").date() - dt.date.today()).days <= 1
        assert image["uri"] == f"oci://images@tenancyns/{name}"
        assert (image["bucket"], image["namespace"], image["stored"]) == ("images", "tenancyns", True)
        assert "data" not in image
        stored = fake.object("images", name)
        assert hashlib.sha256(stored.data).hexdigest() == image["sha256"] and stored.content_type == "image/png"
        assert stored.metadata == {"seed": "7", "steps": "2", "guidance": "7.0", "width": "256", "height": "256",
                                   "model": "tiny", "prompt-sha256": hashlib.sha256(PROMPT.encode()).hexdigest()}
        assert httpx.get(image["url"]).content == stored.data  # the read-only link works without credentials

    # Every call the service made was signed with the resource principal's session token, and none
    # carried the prompt text in a header.
    calls = [r for r in fake.requests if not r.path.startswith("/p/")]
    assert calls and {r.key_id for r in calls} == {principal.key_id}
    assert not any(PROMPT in value for r in calls for value in r.headers.values())


def test_the_sidecar_records_every_parameter_and_reproduces_the_image(server, fake):
    first = predict(server, {"prompt": PROMPT, "negative_prompt": "blurry", "guidance_scale": 4.5, **SMALL}).json()
    name = first["images"][0]["object_name"].rsplit("-", 1)[0] + ".json"
    sidecar = json.loads(fake.object("images", name).data)

    assert sidecar["request_id"] == first["request_id"] and sidecar["model"] == "tiny"
    assert sidecar["parameters"] == {"prompt": PROMPT, "negative_prompt": "blurry", "guidance_scale": 4.5,
                                     "seed": first["seed"], "num_images": 1, "output_format": "png",
                                     "num_inference_steps": 2, "width": 256, "height": 256}
    assert sidecar["images"] == [{"object_name": first["images"][0]["object_name"],
                                  "sha256": first["images"][0]["sha256"], "bytes": first["images"][0]["bytes"]}]

    again = predict(server, sidecar["parameters"]).json()
    assert again["images"][0]["sha256"] == first["images"][0]["sha256"]


def test_the_openai_surface_stores_as_predict_does_and_answers_links(server, fake):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        raw = client.images.with_raw_response.generate(prompt=PROMPT, size="256x256", response_format="url",
                                                        extra_body={"num_inference_steps": 2, "seed": 7})
    [item] = raw.parse().data
    request_id = raw.headers["x-request-id"]
    assert item.url and item.b64_json is None
    [name] = [name for name in fake.names("images") if name.endswith(f"/{request_id}-0.png")]
    stored = fake.object("images", name)
    assert httpx.get(item.url).content == stored.data  # the read-only link, as /predict's `url`
    assert stored.metadata == {"seed": "7", "steps": "2", "guidance": "7.0", "width": "256", "height": "256",
                               "model": "tiny", "prompt-sha256": hashlib.sha256(PROMPT.encode()).hexdigest()}
    record = json.loads(fake.object("images", f"sd3/requests/{request_id}.json").data)
    assert record["state"] == "done" and record["answer"]["images"][0]["object_name"] == name
    # a client that reads `url` without asking for it (LibreChat's DALL-E 3 tool) finds it beside the bytes
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        [both] = client.images.generate(prompt=PROMPT, size="256x256", extra_body={"num_inference_steps": 2}).data
    assert both.b64_json and httpx.get(both.url).content == base64.b64decode(both.b64_json)


def test_an_images_metadata_names_its_adapters_by_content(server, fake, adapters):
    answer = predict(server, {"prompt": PROMPT, "seed": 7, **SMALL, "loras": [{"name": "ink", "scale": 0.6}]})
    assert answer.status_code == 200, answer.text
    stored = fake.object("images", answer.json()["images"][0]["object_name"])
    ink = hashlib.sha256((adapters.catalog / "ink.safetensors").read_bytes()).hexdigest()
    assert stored.metadata["lora-0"] == f"{ink}:0.6"


def test_health_describes_the_bucket(server, fake):
    assert health_store(server) == {
        "kind": "oci", "bucket": "images", "namespace": "tenancyns", "auth": "resource_principal",
        "region": "us-ashburn-1", "endpoint": fake.endpoint, "state": "ok", "spooled": 0,
        "spool_dir": str(server.spool.root)}


def test_a_burst_of_503_and_429_is_retried_and_the_image_stored(server, fake):
    image_put = lambda r: r.method == "PUT" and "requests%2F" not in r.path  # noqa: E731 - not the ledger's
    fake.fail_next(2, 503, when=image_put)
    fake.fail_next(1, 429, when=image_put)

    answer = predict(server, {"prompt": PROMPT, **SMALL}).json()

    image = answer["images"][0]
    assert image["stored"] is True and fake.object("images", image["object_name"]) is not None
    puts = [r.status for r in fake.seen("PUT", image["object_name"].replace("/", "%2F"))]
    assert puts == [503, 503, 429, 200]


def test_an_outage_answers_the_image_inline_and_stores_it_when_the_bucket_is_back(server, fake):
    before = scrape(server)
    fake.outage(503)

    response = predict(server, {"prompt": PROMPT, **SMALL})

    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    assert image["stored"] is False and image["uri"] == f"oci://images@tenancyns/{image['object_name']}"
    data = base64.b64decode(image["data"])
    assert hashlib.sha256(data).hexdigest() == image["sha256"] and "url" not in image
    sidecar = image["object_name"].rsplit("-", 1)[0] + ".json"
    record = f"sd3/requests/{response.json()['request_id']}.json"  # the ledger's, written once the store is back
    spooled = {kept.image.name: kept.image.data for kept in map(server.spool.load, server.spool.pending())}
    assert spooled.keys() == {image["object_name"], sidecar, record} and spooled[image["object_name"]] == data
    store = health_store(server)
    assert store["state"] == "failing" and store["spooled"] == 3 and "503" in store["error"]
    assert fake.object("images", image["object_name"]) is None
    during = scrape(server)  # what an operator sees meanwhile
    assert value(during, "sd3_store_failures_total") > value(before, "sd3_store_failures_total")
    assert value(during, "sd3_spooled_images") == 3

    fake.restore()

    wait_until(lambda: health_store(server)["spooled"] == 0)
    assert fake.object("images", image["object_name"]).data == data
    assert json.loads(fake.object("images", sidecar).data)["images"][0]["sha256"] == image["sha256"]
    assert json.loads(fake.object("images", record).data)["answer"]["images"][0]["sha256"] == image["sha256"]
    assert server.spool.pending() == [] and health_store(server)["state"] == "ok"
    assert value(scrape(server), "sd3_spooled_images") == 0
    timed = {dict(labels)["operation"] for name, labels in during if name == "sd3_ledger_seconds_count"}
    assert {"create", "replace"} <= timed  # the claims and final records of the requests before, timed

    # The client's retry with the same request_id now learns the image is stored, and gets no inline copy.
    again = predict(server, {"prompt": PROMPT, **SMALL, "request_id": response.json()["request_id"]})
    [stored] = again.json()["images"]
    assert stored["stored"] is True and "data" not in stored and stored["sha256"] == image["sha256"]
    assert stored["uri"] == image["uri"] and httpx.get(stored["url"]).content == data


def test_a_missing_credential_keeps_images_and_a_restart_with_one_uploads_them(fake, principal, tmp_path):
    spool_dir = tmp_path / "spool"
    # Outside OCI, with no resource principal at all: the service still starts and serves.
    broken = start_server(tmp_path / "broken", bucket_env(fake, spool_dir, NAMESPACE="tenancyns"))
    try:
        store = health_store(broken)
        response = predict(broken, {"prompt": PROMPT, **SMALL})
        second = predict(broken, {"prompt": PROMPT, **SMALL})
    finally:
        stop_server(broken)
    assert store["state"] == "failing" and "OCI_RESOURCE_PRINCIPAL_VERSION is not defined" in store["error"]
    images = [r.json()["images"][0] for r in (response, second)]
    assert all(r.status_code == 200 for r in (response, second))
    assert [i["stored"] for i in images] == [False, False]
    log = broken.log()
    assert log.count("The image store is unusable") == 1 and "Traceback" not in log, log
    kept = sorted(Spool(spool_dir).load(path).image.name for path in Spool(spool_dir).pending())
    records = [f"sd3/requests/{r.json()['request_id']}.json" for r in (response, second)]
    assert kept == sorted([image["object_name"] for image in images] + records)  # the images, and their records

    # Restarted with the credential: the spooled images go up under the names the answers gave.
    fixed = start_server(tmp_path / "fixed", {**principal.env, **bucket_env(fake, spool_dir)})
    try:
        for image in images:
            wait_until(lambda: fake.object("images", image["object_name"]) is not None)
            assert fake.object("images", image["object_name"]).data == base64.b64decode(image["data"])
        wait_until(lambda: Spool(spool_dir).pending() == [])
        assert all(json.loads(fake.object("images", name).data)["state"] == "done" for name in records)
    finally:
        stop_server(fixed)


# -- starting images (image to image, inpainting) --------------------------------------------------------------

START = file_bytes(noise(320, 256))
IMG2IMG = {"prompt": PROMPT, "num_inference_steps": 5, "seed": 3}


def test_an_oci_input_is_read_with_the_services_own_signed_call(server, fake, principal):
    fake.add_object("inputs", "photos/start.png", START, "image/png")
    answer = predict(server, {**IMG2IMG, "image": "oci://inputs@tenancyns/photos/start.png"})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["images"][0]["width"], answer.json()["images"][0]["height"]) == (320, 256)
    [read] = fake.seen("GET", "/b/inputs/o/photos%2Fstart.png")  # the SDK quotes the slash
    assert read.key_id == principal.key_id  # signed as the deployment, and the fake verified the signature
    # The same bytes sent inline are the same input: the same image comes out.
    inline = predict(server, {**IMG2IMG, "image": b64(START)}).json()
    assert inline["images"][0]["sha256"] == answer.json()["images"][0]["sha256"]


def test_an_inputs_metadata_and_sidecar_record_its_digest_never_its_bytes(server, fake):
    mask = file_bytes(left_half_mask(320, 256))
    first = predict(server, {**IMG2IMG, "image": b64(START), "mask_image": b64(mask), "strength": 0.9}).json()
    stored = fake.object("images", first["images"][0]["object_name"])
    assert stored.metadata["mode"] == "inpaint" and stored.metadata["strength"] == "0.9"
    assert stored.metadata["input-sha256"] == hashlib.sha256(START).hexdigest()
    assert stored.metadata["input-bytes"] == str(len(START)) and stored.metadata["input-size"] == "320x256"
    assert stored.metadata["mask-sha256"] == hashlib.sha256(mask).hexdigest()

    sidecar_object = fake.object("images", first["images"][0]["object_name"].rsplit("-", 1)[0] + ".json")
    sidecar = json.loads(sidecar_object.data)
    assert sidecar["inputs"]["image"] == {"sha256": hashlib.sha256(START).hexdigest(), "bytes": len(START),
                                          "width": 320, "height": 256, "format": "PNG"}
    assert sidecar["inputs"]["mask_image"]["sha256"] == hashlib.sha256(mask).hexdigest()
    assert "image" not in sidecar["parameters"] and "mask_image" not in sidecar["parameters"]
    assert b64(START) not in sidecar_object.data.decode()
    # The parameters, with the same input sent again, make the same image.
    again = predict(server, {**sidecar["parameters"], "image": b64(START), "mask_image": b64(mask)}).json()
    assert again["images"][0]["sha256"] == first["images"][0]["sha256"]


def test_an_oci_input_that_is_not_there_is_404_naming_the_field(server, fake):
    response = predict(server, {**IMG2IMG, "image": "oci://inputs@tenancyns/missing.png"})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("input_not_found", "image") and "missing.png" in error["message"]


def test_an_oci_input_from_a_bucket_not_allowed_is_400_and_never_read(server, fake):
    fake.add_object("private", "secret.png", START, "image/png")
    response = predict(server, {**IMG2IMG, "image": b64(START), "mask_image": "oci://private@tenancyns/secret.png"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == "mask_image" and "allowed: images, inputs" in error["message"]
    assert not fake.seen("GET", "/b/private/")


def test_an_oci_input_that_is_not_an_image_is_400(server, fake):
    fake.add_object("inputs", "notes.txt", b"not an image", "text/plain")
    response = predict(server, {**IMG2IMG, "image": "oci://inputs@tenancyns/notes.txt"})
    assert response.status_code == 400 and response.json()["error"]["field"] == "image", response.text


def test_an_object_storage_outage_while_reading_an_input_is_503_with_retry_after(server, fake):
    fake.add_object("inputs", "later.png", START, "image/png")
    fake.outage(503, when=lambda request: "/b/inputs/" in request.path)
    response = predict(server, {**IMG2IMG, "image": "oci://inputs@tenancyns/later.png"})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "input_unavailable" and response.headers["retry-after"] == "10"
    fake.restore()
    assert predict(server, {**IMG2IMG, "image": "oci://inputs@tenancyns/later.png"}).status_code == 200
