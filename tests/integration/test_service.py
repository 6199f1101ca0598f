"""The service over HTTP, as users call it: the real `bentoml serve` with the tiny SD3 pipeline."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image

from testbed.server import start_server, stop_server

SAMPLE_BODY = {"prompt": "A cat holding a sign that says hello World", "num_inference_steps": 10, "guidance_scale": 7.0}
SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}


def predict(server, body, **kwargs) -> httpx.Response:
    with server.client() as client:
        return client.post("/predict", json=body, **kwargs)


def file_of(image: dict) -> Path:
    return Path(urlparse(image["uri"]).path)


def test_health_reports_loading_then_ready(server):
    # The route answers while the model loads (a load that blocked it would show no `loading` answer at all);
    # how soon it answers is measured by bench/startup.py, not asserted here.
    statuses = [(status, body.get("status")) for status, body, _ in server.health_seen]
    assert (503, "loading") in statuses, statuses
    assert statuses.index((503, "loading")) < len(statuses) - 1 and statuses[-1] == (200, "ready"), statuses
    with server.client() as client:
        body = client.get("/health").json()
    assert body["model"] == "tiny" and body["device"] == "cpu" and body["dtype"] == "float32"


def test_the_original_sample_body_works_unchanged(server):
    response = predict(server, SAMPLE_BODY)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert re.fullmatch(r"[0-9a-f]{32}", answer["request_id"])
    assert 0 <= answer["seed"] < 2**32
    assert set(answer["timings_ms"]) == {"queue", "generate", "encode", "store"}
    [image] = answer["images"]
    day = r"\d{4}/\d{2}/\d{2}"
    assert re.fullmatch(rf"sd3/{day}/{answer['request_id']}-0\.png", image["object_name"])
    assert image["uri"].startswith("file://") and image["uri"].endswith(image["object_name"])
    assert image["bucket"] is None and image["namespace"] is None and image["stored"] is True
    assert "data" not in image
    data = file_of(image).read_bytes()
    assert len(data) == image["bytes"] and hashlib.sha256(data).hexdigest() == image["sha256"]
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.size == (1024, 1024) == (image["width"], image["height"])
    assert image["content_type"] == "image/png"


def oci_config(folder: Path) -> Path:
    """An OCI config file with a fresh API key in `folder` (the service does not check signatures; OCI would)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = folder / "key.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    config = folder / "config"
    config.write_text(
        "[DEFAULT]\nuser=ocid1.user.oc1..test\nfingerprint=11:22:33:44:55:66:77:88:99:00:aa:bb:cc:dd:ee:ff\n"
        f"key_file={key_file}\ntenancy=ocid1.tenancy.oc1..test\nregion=us-ashburn-1\n"
    )
    config.chmod(0o600)
    return config


def oci_raw_request(url: str, body: dict | str, folder: Path) -> dict:
    """`oci raw-request`, as the README has users call the service, signed with a fresh API key; its JSON output.

    `body`: the JSON body, or `file://...` naming a file that holds it."""
    config = oci_config(folder)
    oci_cli = Path(sys.executable).with_name("oci")
    result = subprocess.run(
        [str(oci_cli), "raw-request", "--config-file", str(config), "--http-method", "POST",
         "--target-uri", url, "--request-body", body if isinstance(body, str) else json.dumps(body)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_oci_raw_request_with_an_api_key_gets_the_json_answer(server, tmp_path):
    output = oci_raw_request(f"{server.url}/predict", SAMPLE_BODY, tmp_path)
    assert output["status"].startswith("200"), output
    assert output["data"]["images"][0]["stored"] is True
    assert file_of(output["data"]["images"][0]).is_file()


def test_oci_raw_request_sends_an_img2img_request(server, tmp_path):
    from image_samples import b64, noise

    body = {"prompt": "a lighthouse at dusk", "image": b64(noise(256, 256)), "strength": 0.6,
            "num_inference_steps": 5}
    # A 256x256 photo-like PNG is ~260 KB in base64: over what one command-line argument may hold, so the body
    # goes in a file, as the README shows (`--request-body file://body.json`).
    (tmp_path / "body.json").write_text(json.dumps(body))
    output = oci_raw_request(f"{server.url}/predict", f"file://{tmp_path / 'body.json'}", tmp_path)
    assert output["status"].startswith("200"), output
    [image] = output["data"]["images"]
    assert (image["width"], image["height"]) == (256, 256) and file_of(image).is_file()


def test_same_seed_same_bytes_other_seed_other_bytes(server):
    first = predict(server, {"prompt": "a red fox", "seed": 42, **SMALL}).json()
    again = predict(server, {"prompt": "a red fox", "seed": 42, **SMALL}).json()
    other = predict(server, {"prompt": "a red fox", "seed": 43, **SMALL}).json()
    assert first["request_id"] != again["request_id"]
    assert first["images"][0]["sha256"] == again["images"][0]["sha256"]
    assert first["images"][0]["sha256"] != other["images"][0]["sha256"]
    assert first["seed"] == 42 and other["seed"] == 43


def test_a_repeated_request_id_returns_the_first_answer_without_generating_again(server):
    body = {"prompt": "a lighthouse", "request_id": "retry-me_1", **SMALL}
    with ThreadPoolExecutor(2) as pool:  # a client retrying while the first call still runs
        first, concurrent = pool.map(lambda _: predict(server, body), range(2))
    later = predict(server, body)
    assert first.status_code == concurrent.status_code == later.status_code == 200
    assert first.json() == concurrent.json() == later.json()
    assert first.json()["request_id"] == "retry-me_1"
    assert server.log().count("[retry-me_1] Generated") == 1
    # The same id with other parameters is not the same request: refused, naming what differs.
    reused = predict(server, {**body, "seed": 7, "prompt": "a windmill"})
    assert reused.status_code == 409, reused.text
    assert reused.json()["error"]["code"] == "request_id_reused" and reused.json()["error"]["field"] == "prompt"
    assert "prompt, seed" in reused.json()["error"]["message"]


@pytest.mark.parametrize("output_format,pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_several_images_in_each_format(server, output_format, pil_format):
    body = {"prompt": "three boats", "num_images": 3, "output_format": output_format, "seed": 5,
            "width": 320, "height": 256, "num_inference_steps": 2}
    answer = predict(server, body).json()
    assert [image["object_name"].rsplit("/", 1)[1] for image in answer["images"]] == [
        f"{answer['request_id']}-{i}.{output_format}" for i in range(3)]
    assert len({image["sha256"] for image in answer["images"]}) == 3
    for image in answer["images"]:
        decoded = Image.open(file_of(image))
        assert decoded.format == pil_format and decoded.size == (320, 256)
        assert image["content_type"] == f"image/{output_format}"


def test_txt2img_answers_the_image_bytes(server):
    with server.client() as client:
        response = client.post("/txt2img", json={"prompt": "a kite", "seed": 3, **SMALL})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (256, 256)
    assert response.headers["x-seed"] == "3"


BAD_INPUTS = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "negative_prompt": "x" * 2001}, "negative_prompt"),
    ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "a", "num_inference_steps": 51}, "num_inference_steps"),
    ({"prompt": "a", "num_inference_steps": 2.5}, "num_inference_steps"),
    ({"prompt": "a", "num_inference_steps": "ten"}, "num_inference_steps"),
    ({"prompt": "a", "guidance_scale": -0.1}, "guidance_scale"),
    ({"prompt": "a", "guidance_scale": 20.5}, "guidance_scale"),
    ({"prompt": "a", "width": 255}, "width"),
    ({"prompt": "a", "width": 1552}, "width"),
    ({"prompt": "a", "height": 1000}, "height"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": 2**32}, "seed"),
    ({"prompt": "a", "num_images": 0}, "num_images"),
    ({"prompt": "a", "num_images": 5}, "num_images"),
    ({"prompt": "a", "output_format": "gif"}, "output_format"),
    ({"prompt": "a", "request_id": "../../etc/passwd"}, "request_id"),
    ({"prompt": "a", "request_id": "x" * 65}, "request_id"),
    ({"prompt": "a", "num_inference_step": 10}, "num_inference_step"),
]


@pytest.mark.parametrize("body,field", BAD_INPUTS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_400_naming_the_field(server, body, field):
    response = predict(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["field"] == field and field in error["message"]


def test_every_problem_is_reported_at_once(server):
    response = predict(server, {"prompt": "", "width": 100, "output_format": "bmp", "colour": "red"})
    fields = {problem["field"] for problem in response.json()["error"]["problems"]}
    assert fields == {"prompt", "width", "output_format", "colour"}
    assert "allowed fields" in response.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b'{"prompt": ', b"not json", b"\xff\xfe", b"[1, 2]", b'"a cat"', b""])
def test_malformed_bodies_get_400(server, raw):
    with server.client() as client:
        response = client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "body"


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain",
                                          "multipart/form-data; boundary=x"])
def test_a_json_body_is_read_as_json_whatever_content_type_it_declares(server, content_type):
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"prompt": "a", **SMALL}).encode()
    with server.client() as client:
        response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["stored"]


def test_a_body_over_10_mb_gets_413(server):
    body = json.dumps({"prompt": "a", "negative_prompt": "x" * (10 * 1024 * 1024)}).encode()
    with server.client() as client:
        declared = client.post("/predict", content=body, headers={"content-type": "application/json"})
        streamed = client.post("/predict", content=iter([body[:1024], body[1024:]]),
                               headers={"content-type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"


def test_a_body_nested_too_deep_gets_400_not_silence(server):
    # 3 KB of JSON 1,500 arrays deep: Python's parser gives up with a RecursionError, which must still be answered.
    for route in ("/predict", "/txt2img", "/img2img"):
        with server.client(timeout=30) as client:
            response = client.post(route, content=b"[" * 1500 + b"]" * 1500,
                                   headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"] == {"code": "malformed_json", "field": "body",
                                            "message": "the body is not valid JSON here: it is nested too deeply"}


def test_bentomls_own_client_calls_every_native_route_polling_included(server):
    import bentoml
    from bentoml.exceptions import BentoMLException

    gate = f"client-{uuid.uuid4().hex[:6]}"
    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        answer = client.predict(prompt="a kite", width=256, height=256, num_inference_steps=2, seed=3)
        assert answer["seed"] == 3 and file_of(answer["images"][0]).is_file()
        accepted = client.predict(prompt=server.hold(gate), request_id=gate, wait=False, **SMALL)
        assert accepted["request_id"] == gate and accepted["status"] in ("queued", "running")
        server.wait_held(gate)
        assert client.predict(request_id=gate)["status"] == "running"  # a poll: the id alone
        server.release(gate)
        while "images" not in (polled := client.predict(request_id=gate)):
            time.sleep(0.02)  # 202: still running
        assert polled["request_id"] == gate and file_of(polled["images"][0]).is_file()
        png = client.txt2img(prompt="a kite", width=256, height=256, num_inference_steps=2)
        assert Image.open(io.BytesIO(png)).size == (256, 256)
        from image_samples import b64, noise

        repainted = client.img2img(prompt="a kite", image=b64(noise(256, 256)), num_inference_steps=2)
        assert Image.open(io.BytesIO(repainted)).size == (256, 256)
        with pytest.raises(BentoMLException) as refused:
            client.predict(prompt="a kite", width=7)
        assert refused.value.error_code == 400 and "width" in str(refused.value)


def test_the_local_store_keeps_nothing_but_images_and_records(server):
    kept = [path.relative_to(server.image_dir) for path in server.image_dir.rglob("*") if path.is_file()]
    assert kept, "the tests above stored images"
    strays = [path for path in kept if path.suffix not in (".png", ".jpeg", ".webp", ".json")
              or path.name.startswith(".")]
    assert strays == []


def test_the_api_page_loads_nothing_from_outside_the_deployment(server):
    with server.client() as client:
        page = client.get("/").text
    loaded = re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"']([^\"']+)", page)
    assert loaded and all(not re.match(r"(https?:)?//", url) for url in loaded), loaded
    assert "googletagmanager" not in page and "validatorUrl: null" in page
    with server.client() as client:
        for url in loaded:  # and what it does load is there
            assert client.get(url.removeprefix(".")).status_code == 200, url


def test_no_5xx_was_logged_by_the_shared_server(server):
    # Runs last in this module (pytest keeps file order): every request above was answered below 500.
    assert not re.search(r"status=5\d\d", server.log()), server.log()


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """A server with the settings of the tests below at once: no waiting room (`MAX_QUEUE=0`), routes remapped as
    Model Deployment does, and no `--host` (the service's own default)."""
    running = start_server(tmp_path_factory.mktemp("custom"), {
        "MAX_QUEUE": "0", "MODEL_DEPLOY_PREDICT_ENDPOINT": "/v1/generate", "MODEL_DEPLOY_HEALTH_ENDPOINT": "/ping"},
        host=None, gates=True)
    yield running
    stop_server(running)


def test_a_full_queue_answers_429_with_retry_after(custom):
    gate = f"busy-{uuid.uuid4().hex[:6]}"
    with custom.client() as client, ThreadPoolExecutor(1) as background:
        running = background.submit(client.post, "/v1/generate", json={"prompt": custom.hold(gate), **SMALL})
        try:
            custom.wait_held(gate)  # the one device is taken, and no request may wait
            refused = client.post("/v1/generate", json={"prompt": "one too many", **SMALL})
            assert client.get("/ping").status_code == 200  # health stays reachable while the GPU is busy
        finally:
            custom.release(gate)
        assert running.result().status_code == 200
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "queue_full"


def test_a_model_that_fails_to_load_is_reported_by_health_and_predict(make_server, tmp_path):
    not_a_pipeline = tmp_path / "empty-model"
    not_a_pipeline.mkdir()
    broken = make_server({"SD3_MODEL": str(not_a_pipeline)})
    with broken.client() as client:
        health = client.get("/health")
        answer = client.post("/predict", json={"prompt": "a"})
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert "model_index.json" in health.json()["error"]
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert answer.json()["error"]["code"] == "not_ready"
    assert "Loading the model failed" in broken.log()


def test_routes_follow_the_model_deployment_env_vars(custom):
    with custom.client() as client:
        assert client.get("/ping").status_code == 200
        ok = client.post("/v1/generate", json={"prompt": "a", **SMALL})
        bad = client.post("/v1/generate", json={"prompt": "a", "width": 7})
    assert ok.status_code == 200 and ok.json()["images"][0]["stored"]
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "width"


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port`, read from /proc/net/tcp (IPv4) and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_bentoml_serve_without_host_listens_on_loopback_only(custom):
    port = int(custom.url.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"0100007F"}, "expected 127.0.0.1 only"  # little-endian hex
