"""LoRA adapters per request, through the real server with two devices (`pool`): from its catalog and a bucket."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from integration.conftest import LORA_MAX_BYTES
from integration.test_service import file_of
from testbed.loras import sdxl_like, wider_model

CLOUD = "oci://adapters@tenancyns/styles/cloud.safetensors"
BODY = {"prompt": "a harbour at dawn", "seed": 11, "width": 256, "height": 256, "num_inference_steps": 3}


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
        try:
            for gate in gates:  # both generating at once: one on each device
                pool.wait_held(gate)
        finally:
            for gate in gates:
                pool.release(gate)
        shas = [answer.result().json()["images"][0]["sha256"] for answer in answers]
    devices = {re.search(rf"\[{gate}\] Generating on cpu \(device (\d)\)", pool.log())[1] for gate in gates}
    assert devices == {"0", "1"} and shas[0] == shas[1]


def test_records_and_sidecars_name_each_adapter_by_its_content(pool, adapters):
    request_id = f"lora-record-{uuid.uuid4().hex[:6]}"
    answer = predict(pool, {**BODY, "request_id": request_id, "loras": [{"name": "ink", "scale": 0.8}]}).json()
    ink_sha = hashlib.sha256((adapters.catalog / "ink.safetensors").read_bytes()).hexdigest()
    image = file_of(answer["images"][0])
    record = json.loads((pool.image_dir / "sd3" / "requests" / f"{request_id}.json").read_text())
    assert record["parameters"]["loras"] == [{"sha256": ink_sha, "scale": 0.8}]
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


def test_health_shows_the_catalog_and_what_each_device_holds(pool):
    sha(pool, loras=[{"name": "ink"}])
    with pool.client() as client:
        loras = client.get("/health").json()["loras"]
    assert [adapter["name"] for adapter in loras["catalog"]] == ["ink", "wave"]
    assert set(loras["loaded"]) == {"cpu:0", "cpu:1"} and any("ink" in held for held in loras["loaded"].values())


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


def test_the_bucket_unreachable_is_503_with_retry_after(pool, adapters, plain):
    adapters.bucket.add_object("adapters", "later.safetensors", (adapters.catalog / "wave.safetensors").read_bytes())
    adapters.bucket.outage(503)
    try:
        response = predict(pool, {**BODY, "loras": [{"name": "oci://adapters@tenancyns/later.safetensors"}]})
    finally:
        adapters.bucket.restore()
    assert response.status_code == 503 and response.headers["retry-after"] == "10", response.text
    assert response.json()["error"]["code"] == "lora_unavailable"
    assert sha(pool, loras=[{"name": "oci://adapters@tenancyns/later.safetensors"}]) == \
        sha(pool, loras=[{"name": "wave"}])  # the same content, by either name
