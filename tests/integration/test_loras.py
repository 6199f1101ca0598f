"""LoRA adapters per request, through the real server with two devices (`pool`): from its catalog and a bucket."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from image_samples import file_bytes, noise
from integration.conftest import LORA_MAX_BYTES
from integration.test_service import file_of
from testbed.loras import sdxl_like, wider_model, with_bad_config

CLOUD = "oci://adapters@tenancyns/styles/cloud.safetensors"
BODY = {"prompt": "a harbour at dawn", "seed": 11, "width": 256, "height": 256, "num_inference_steps": 3}
START = file_bytes(noise(256, 256, seed=4))


def predict(server, body, **kwargs):
    with server.client() as client:
        return client.post("/predict", json=body, **kwargs)


def sha(server, **fields) -> str:
    response = predict(server, {**BODY, **fields})
    assert response.status_code == 200, response.text
    return response.json()["images"][0]["sha256"]


@pytest.fixture(scope="module")
def plain(server) -> str:
    """The image a server that never loaded an adapter makes (the shared server never takes one)."""
    return sha(server)


def test_an_adapter_changes_the_image_and_scale_zero_or_none_is_exactly_the_plain_one(pool, plain):
    assert sha(pool) == plain  # this server too, before and after adapters
    inked = sha(pool, loras=[{"name": "ink"}])
    assert inked != plain
    assert sha(pool, loras=[{"name": "ink", "scale": 0}]) == plain
    assert sha(pool, loras=[{"name": "ink", "scale": 0.5}]) not in (plain, inked)
    assert sha(pool, loras=[{"name": "ink", "scale": 1.0}]) == inked  # loaded, then reused: the same bytes
    assert sha(pool) == plain  # a request without adapters after adapter requests


def test_two_adapters_at_once_from_the_catalog_and_a_bucket(pool, plain):
    ink, cloud = sha(pool, loras=[{"name": "ink"}]), sha(pool, loras=[{"name": CLOUD}])
    both = sha(pool, loras=[{"name": "ink"}, {"name": CLOUD, "scale": 0.7}])
    assert len({plain, ink, cloud, both}) == 4


def test_both_devices_make_the_same_bytes_with_the_same_adapters(pool):
    gates = [f"lora-{uuid.uuid4().hex[:6]}-{n}" for n in range(2)]
    with ThreadPoolExecutor(2) as threads:
        answers = [threads.submit(predict, pool, {**BODY, "prompt": pool.hold(gate, BODY["prompt"]),
                                                  "request_id": gate, "loras": [{"name": "wave"}, {"name": CLOUD}]})
                   for gate in gates]
        pool.all_held_then_released(gates)  # both generating at once: one on each device
        shas = [answer.result().json()["images"][0]["sha256"] for answer in answers]
    devices = {re.search(rf"\[{gate}\] Generating on cpu \(device (\d)\)", pool.log())[1] for gate in gates}
    assert devices == {"0", "1"} and shas[0] == shas[1]


def test_records_and_sidecars_name_each_adapter_by_its_content(pool, adapters):
    request_id = f"lora-record-{uuid.uuid4().hex[:6]}"
    answer = predict(pool, {**BODY, "request_id": request_id, "loras": [{"name": "ink", "scale": 0.8}]}).json()
    ink_sha = hashlib.sha256((adapters.catalog / "ink.safetensors").read_bytes()).hexdigest()
    image = file_of(answer["images"][0])
    record = json.loads((pool.image_dir / "sd3" / "requests" / f"{request_id}.json").read_text())
    assert record["parameters"]["loras"] == [{"name": "ink", "scale": 0.8}]  # as sent: a repeat downloads nothing
    sidecar = json.loads(image.with_name(f"{request_id}.json").read_text())
    assert sidecar["loras"] == [{"name": "ink", "sha256": ink_sha, "scale": 0.8}]
    assert sidecar["parameters"]["loras"] == [{"name": "ink", "scale": 0.8}]
    # The same id with another adapter's content is another request: 409, like any other changed field.
    reused = predict(pool, {**BODY, "request_id": request_id, "loras": [{"name": "wave", "scale": 0.8}]})
    assert reused.status_code == 409 and reused.json()["error"]["field"] == "loras", reused.text


def test_a_bucket_adapter_is_downloaded_once_and_each_adapter_loaded_once_per_device(pool, adapters):
    for seed in range(4):
        sha(pool, loras=[{"name": CLOUD}], seed=seed)
    downloads = adapters.bucket.seen("GET", "/b/adapters/o/styles%2Fcloud.safetensors")
    assert len(downloads) == 1  # later requests only ask whether it changed (HEAD)
    loads = re.findall(r"Loaded LoRA (\S+) \(sha256 \w+\) on cpu \(device (\d)\)", pool.log())
    assert (CLOUD, "0") in loads or (CLOUD, "1") in loads
    assert len(loads) == len(set(loads)), loads  # never twice on one device


def test_health_shows_the_catalog_and_what_each_device_holds_by_content_never_a_callers_uri(pool, adapters):
    sha(pool, loras=[{"name": "ink"}])
    sha(pool, loras=[{"name": CLOUD}])
    with pool.client() as client:
        health = client.get("/health")
    loras = health.json()["loras"]
    assert [adapter["name"] for adapter in loras["catalog"]] == ["ink", "wave"] and loras["fused"] == []
    ink_sha = hashlib.sha256((adapters.catalog / "ink.safetensors").read_bytes()).hexdigest()
    assert set(loras["loaded"]) == {"cpu:0", "cpu:1"} and any(ink_sha in held for held in loras["loaded"].values())
    assert "oci://" not in health.text and "styles/" not in health.text


def test_the_openai_surface_takes_adapters_as_an_extension(pool, plain):
    with openai.OpenAI(base_url=pool.url + "/v1", api_key="unused", max_retries=0) as client:
        result = client.images.generate(prompt=BODY["prompt"], size="256x256", extra_body={
            "seed": 11, "num_inference_steps": 3, "loras": [{"name": "ink"}]})
        with pytest.raises(openai.NotFoundError) as missing:
            client.images.generate(prompt="a", size="256x256", extra_body={"loras": [{"name": "nowhere"}]})
    import base64

    assert hashlib.sha256(base64.b64decode(result.data[0].b64_json)).hexdigest() == sha(pool, loras=[{"name": "ink"}])
    assert missing.value.param == "loras.0" and missing.value.code == "lora_not_found"


BAD = {
    "a name not in the catalog": ([{"name": "nowhere"}], 404, "loras.0", "lora_not_found"),
    "an object not in the bucket": ([{"name": "oci://adapters@tenancyns/missing.safetensors"}], 404, "loras.0",
                                    "lora_not_found"),
    "a bucket not allowed": ([{"name": "ink"}, {"name": "oci://elsewhere@tenancyns/a.safetensors"}], 400, "loras.1",
                             "invalid_input"),
    "a file over LORA_MAX_BYTES": ([{"name": "oci://adapters@tenancyns/huge.safetensors"}], 400, "loras.0",
                                   "invalid_input"),
    "not safetensors": ([{"name": "oci://adapters@tenancyns/notes.txt"}], 400, "loras.0", "invalid_input"),
    "an SDXL adapter": ([{"name": "oci://adapters@tenancyns/sdxl.safetensors"}], 400, "loras.0", "invalid_input"),
    "an adapter of a wider model": ([{"name": "oci://adapters@tenancyns/wide.safetensors"}], 400, "loras.0",
                                    "invalid_input"),
    "a scale over 2": ([{"name": "ink", "scale": 2.5}], 400, "loras.0.scale", "invalid_input"),
    "five adapters": ([{"name": "ink"}] * 5, 400, "loras", "invalid_input"),
    "the same adapter twice": ([{"name": "ink"}, {"name": "ink", "scale": 0.5}], 400, "loras", "invalid_input"),
    "an unknown key": ([{"name": "ink", "weight": 1}], 400, "loras.0.weight", "invalid_input"),
}


@pytest.fixture(scope="module")
def bad_objects(adapters, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-loras")
    adapters.bucket.add_object("adapters", "huge.safetensors", b"\0" * (LORA_MAX_BYTES + 1))
    adapters.bucket.add_object("adapters", "notes.txt", b"not weights at all")
    adapters.bucket.add_object("adapters", "sdxl.safetensors", sdxl_like(folder / "sdxl.safetensors").read_bytes())
    adapters.bucket.add_object("adapters", "wide.safetensors", wider_model(folder / "wide.safetensors").read_bytes())


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_adapter_is_refused_naming_it_before_any_device_and_breaks_nothing(pool, plain, bad_objects, case):
    loras, status, field, code = BAD[case]
    request_id = f"bad-lora-{uuid.uuid4().hex[:6]}"
    response = predict(pool, {**BODY, "request_id": request_id, "loras": loras})
    assert response.status_code == status, response.text
    assert (response.json()["error"]["field"], response.json()["error"]["code"]) == (field, code), response.text
    assert f"[{request_id}] Generating" not in pool.log()  # no device saw it
    assert sha(pool) == plain  # and the next request is as before


def test_the_bucket_unreachable_is_503_with_retry_after_when_polled(pool, adapters, plain):
    adapters.bucket.add_object("adapters", "later.safetensors", (adapters.catalog / "wave.safetensors").read_bytes())
    request_id = f"outage-{uuid.uuid4().hex[:6]}"
    adapters.bucket.outage(503)
    try:  # fetched after admission: accepted, then polled until it ends (the SDK's retries take seconds)
        body = {**BODY, "request_id": request_id, "wait": False,
                "loras": [{"name": "oci://adapters@tenancyns/later.safetensors"}]}
        assert predict(pool, body).status_code == 202
        response = until_answered(pool, request_id, done=(503,))
    finally:
        adapters.bucket.restore()
    assert response.headers["retry-after"] == "10", response.text
    assert response.json()["error"]["code"] == "lora_unavailable"
    assert sha(pool, loras=[{"name": "oci://adapters@tenancyns/later.safetensors"}]) == \
        sha(pool, loras=[{"name": "wave"}])  # the same content, by either name


def until_answered(server, request_id: str, done: tuple[int, ...] = (200,), timeout: float = 120) -> httpx.Response:
    """Poll by id until it ends with one of `done` (a hang guard, not a time bound on the service)."""
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            response = client.post("/predict", json={"request_id": request_id})
            if response.status_code != 202:
                assert response.status_code in done, response.text
                return response
            assert time.monotonic() < deadline, "never answered"
            time.sleep(0.3)


def bucket_adapter(name: str) -> str:
    return f"oci://adapters@tenancyns/styles/{name}.safetensors"


def test_an_adapter_in_diffusers_older_names_draws_what_its_peft_named_copy_draws(pool):
    # ink-old: ink's weights as convert_state_dict_to_diffusers names them (lora.down / lora.up).
    assert sha(pool, loras=[{"name": bucket_adapter("ink-old")}]) == sha(pool, loras=[{"name": "ink"}])


def test_an_adapter_of_the_text_encoders_too_is_loaded_and_scale_zero_is_the_plain_image(pool, plain):
    assert sha(pool, loras=[{"name": bucket_adapter("prose")}]) != plain
    assert sha(pool, loras=[{"name": bucket_adapter("prose"), "scale": 0}]) == plain


def test_an_adapter_diffusers_cannot_load_is_that_requests_400_and_the_devices_go_on(pool, adapters, plain, tmp_path):
    # Its names and shapes fit; peft cannot build the config in its header: only the load on a device finds out.
    broken = with_bad_config(adapters.catalog / "wave.safetensors", tmp_path / "broken.safetensors")
    adapters.bucket.add_object("adapters", "styles/broken.safetensors", broken.read_bytes())
    request_id = f"broken-lora-{uuid.uuid4().hex[:6]}"
    response = predict(pool, {**BODY, "request_id": request_id, "loras": [{"name": "ink"},
                                                                          {"name": bucket_adapter("broken")}]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == "loras.1" and "diffusers could not load this adapter" in error["message"]
    with pool.client() as client:
        polled = client.post("/predict", json={"request_id": request_id})  # recorded as it ended
        assert polled.status_code == 400 and polled.json()["error"]["field"] == "loras.1", polled.text
        assert [device["state"] for device in client.get("/health").json()["devices"]] == ["ready", "ready"]
    assert sha(pool) == plain and sha(pool, loras=[{"name": "ink"}]) != plain  # both devices serve on


def test_a_repeated_request_id_downloads_nothing(pool, adapters):
    adapters.bucket.add_object("adapters", "styles/once.safetensors", (adapters.catalog / "wave.safetensors").read_bytes())
    body = {**BODY, "request_id": f"once-{uuid.uuid4().hex[:6]}", "loras": [{"name": bucket_adapter("once")}]}
    first = predict(pool, body)
    asked = len(adapters.bucket.seen(path_contains="styles%2Fonce"))
    assert first.status_code == 200 and asked == 2  # the HEAD for its ETag, and the one GET
    again = predict(pool, body)
    assert again.json() == first.json() and len(adapters.bucket.seen(path_contains="styles%2Fonce")) == asked


def test_adapter_downloads_have_threads_of_their_own_so_leases_renew_while_they_hang(pool, adapters):
    # Five downloads that hang (more than the four I/O threads that renew leases and store images) ...
    for n in range(5):
        adapters.bucket.add_object("adapters", f"slow/{n}.safetensors",
                                   (adapters.catalog / "wave.safetensors").read_bytes())
    hang = adapters.bucket.hold_next(None, when=lambda request: request.method == "GET" and "/o/slow%2F" in
                                     request.path)
    gate, slow = f"renewing-{uuid.uuid4().hex[:6]}", [f"slow-{uuid.uuid4().hex[:6]}-{n}" for n in range(5)]
    try:
        for n, request_id in enumerate(slow):
            accepted = predict(pool, {**BODY, "wait": False, "request_id": request_id,
                                      "loras": [{"name": f"oci://adapters@tenancyns/slow/{n}.safetensors"}]})
            assert accepted.status_code == 202, accepted.text
        assert hang.held.wait(60)
        # ... and a request held on a device meanwhile: its lease is renewed (every second, LEASE_SECONDS=3) ...
        with ThreadPoolExecutor(1) as thread:
            held = thread.submit(predict, pool, {**BODY, "request_id": gate, "prompt": pool.hold(gate, "a kite")})
            pool.wait_held(gate)
            record = pool.image_dir / "sd3" / "requests" / f"{gate}.json"
            leases = {json.loads(record.read_text())["lease_expires"]}
            for _ in range(600):  # until renewed twice (a hang guard of a minute, not a time bound)
                leases.add(json.loads(record.read_text())["lease_expires"])
                if len(leases) >= 3:
                    break
                time.sleep(0.1)
            # ... before any of the downloads ended (they would give up after STORE_TIMEOUT_SECONDS, 20 s).
            with pool.client() as client:
                waiting = [client.post("/predict", json={"request_id": request_id}).status_code
                           for request_id in slow]
            assert len(leases) >= 3 and waiting == [202] * 5, (leases, waiting)
            pool.release(gate)
            assert held.result().status_code == 200
    finally:
        hang.release()
        adapters.bucket.restore()
        pool.release(gate)
    for request_id in slow:  # and once the bucket answers, each is generated with its adapter
        assert until_answered(pool, request_id).status_code == 200


def edit(pool, fields: list[tuple[str, str]]) -> str:
    """The sha256 of an edit's image, its form parts sent in this order."""
    response = httpx.post(pool.url + "/v1/images/edits", timeout=120, files={"image": ("start.png", START, "image/png")},
                          data=dict([("prompt", "a lighthouse"), ("size", "256x256"), ("seed", "3"),
                                     ("num_inference_steps", "2"), *fields]))  # a dict keeps the parts' order
    assert response.status_code == 200, response.text
    return hashlib.sha256(base64.b64decode(response.json()["data"][0]["b64_json"])).hexdigest()


def test_the_edit_forms_adapter_parts_group_by_number_whatever_their_order(pool):
    in_order = edit(pool, [("loras[0][name]", "ink"), ("loras[0][scale]", "0.5"), ("loras[1][name]", "wave")])
    shuffled = edit(pool, [("loras[1][name]", "wave"), ("loras[0][scale]", "0.5"), ("loras[0][name]", "ink")])
    assert shuffled == in_order
    # The SDK's unnumbered parts: a scale before its name is the same adapter, not a second one.
    assert edit(pool, [("loras[][scale]", "0.5"), ("loras[][name]", "ink")]) == \
        edit(pool, [("loras[0][name]", "ink"), ("loras[0][scale]", "0.5")]) != \
        edit(pool, [("loras[0][name]", "ink")])


def test_the_sdks_edit_sends_adapters_as_form_parts_the_surface_groups(pool):
    # The SDK sends every adapter's loras[][name] first, then every loras[][scale]: the i-th of each goes together.
    def sdk_edit(loras):
        with openai.OpenAI(base_url=pool.url + "/v1", api_key="unused", max_retries=0) as client:
            return client.images.edit(image=("start.png", START, "image/png"), prompt="a lighthouse", size="256x256",
                                      extra_body={"seed": 3, "num_inference_steps": 2, "loras": loras})

    result = sdk_edit([{"name": "ink", "scale": 0.5}, {"name": "wave", "scale": 1.2}])
    sent = hashlib.sha256(base64.b64decode(result.data[0].b64_json)).hexdigest()
    assert sent == edit(pool, [("loras[0][name]", "ink"), ("loras[0][scale]", "0.5"), ("loras[1][name]", "wave"),
                               ("loras[1][scale]", "1.2")])
    with pytest.raises(openai.BadRequestError) as ambiguous:  # which adapter the one scale is for cannot be told
        sdk_edit([{"name": "ink"}, {"name": "wave", "scale": 0.5}])
    assert ambiguous.value.param == "loras" and "loras[0][scale]" in ambiguous.value.message


def pixels_of(image: dict) -> np.ndarray:
    return np.asarray(Image.open(file_of(image)).convert("RGB"), dtype=np.int16)


def test_a_deployment_that_fuses_an_adapter_draws_what_asking_for_it_draws_and_records_it(pool, adapters,
                                                                                          make_server):
    # The same image folder as `pool`, so both read the same request records.
    fused = make_server({"LORA_FUSE": "ink:0.7", "LORA_DIR": str(adapters.catalog), "IMAGE_DIR": str(pool.image_dir),
                         "STORE_PARAMS": "true"})
    ink_sha = hashlib.sha256((adapters.catalog / "ink.safetensors").read_bytes()).hexdigest()
    with fused.client() as client:
        assert client.get("/health").json()["loras"]["fused"] == [{"name": "ink", "sha256": ink_sha, "scale": 0.7}]
    request_id = f"fused-{uuid.uuid4().hex[:6]}"
    answer = predict(fused, {**BODY, "request_id": request_id}).json()
    asked = predict(pool, {**BODY, "loras": [{"name": "ink", "scale": 0.7}]}).json()
    # Measured: at most 1 of 255 apart (the fused weights sum in another order); the adapter moves pixels by ~20.
    assert np.abs(pixels_of(answer["images"][0]) - pixels_of(asked["images"][0])).max() <= 1
    record = json.loads((pool.image_dir / "sd3" / "requests" / f"{request_id}.json").read_text())
    assert record["parameters"]["fused_loras"] == [{"sha256": ink_sha, "scale": 0.7}]
    sidecar = json.loads(file_of(answer["images"][0]).with_name(f"{request_id}.json").read_text())
    assert sidecar["loras"] == [{"name": "ink", "sha256": ink_sha, "scale": 0.7, "fused": True}]
    # The same id where another set is fused (here, none) is another request: 409 naming the field.
    reused = predict(pool, {**BODY, "request_id": request_id})
    assert reused.status_code == 409 and reused.json()["error"]["field"] == "fused_loras", reused.text
