"""The OpenAPI document the real server serves says what the service really answers, and the README's URLs answer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
from PIL import Image

from image_samples import b64, noise

REPO = Path(__file__).resolve().parents[2]
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,negative_data_rejection,"
          "positive_data_acceptance,response_schema_conformance")


def test_the_document_carries_the_projects_version_and_description(server):
    document = httpx.get(server.url + "/docs.json").json()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert document["info"]["version"] == version
    assert "Stable Diffusion 3 Medium" in document["info"]["description"]
    assert "BentoML" not in document["info"]["description"]
    assert httpx.get(server.url + "/openapi.json").json() == document


def test_every_error_status_is_declared_with_the_services_own_body(server):
    document = httpx.get(server.url + "/docs.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for route in ("/predict", "/txt2img", "/img2img"):
        responses = document["paths"][route]["post"]["responses"]
        takes_ids = {"409"} if route == "/predict" else set()  # a reused or interrupted request_id
        # 404: a LoRA adapter (every route), or an oci:// input, that is not there
        assert set(responses) - {"202"} == {"200", "400", "404", "413", "429", "500", "503"} | takes_ids
        for status in ("400", "404", "413", "429", "500", "503", *takes_ids):
            assert responses[status]["content"]["application/json"]["schema"] == error_ref, (route, status)
        assert "Retry-After" in responses["429"]["headers"] and "Retry-After" in responses["503"]["headers"]
        assert document["paths"][route]["post"]["requestBody"]["required"] is True
    predict = document["paths"]["/predict"]["post"]
    assert predict["responses"]["202"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/PendingResponse"} and "Retry-After" in predict["responses"]["202"]["headers"]
    assert predict["requestBody"]["content"]["application/json"]["schema"]["oneOf"] == [
        {"$ref": "#/components/schemas/PredictRequest"}, {"$ref": "#/components/schemas/PollRequest"}]
    error = document["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"code", "message", "field", "problems"}
    assert set(document["paths"]["/health"]["get"]["responses"]) == {"200", "503"}


def test_media_types_and_nullable_fields_are_as_served(server):
    document = httpx.get(server.url + "/docs.json").json()
    for route in ("/txt2img", "/img2img"):
        image = document["paths"][route]["post"]["responses"]["200"]["content"]
        assert set(image) == {"image/png", "image/jpeg", "image/webp"}
    request = document["components"]["schemas"]["PredictRequest"]["properties"]
    assert request["seed"]["nullable"] is True and request["request_id"]["nullable"] is True
    assert "nullable" not in request["prompt"] and request["width"]["nullable"] is True  # null: the default
    assert request["image"]["nullable"] is True and request["mask_image"]["nullable"] is True
    # OpenAPI 3.0's form of `0 < strength <= 1` (JSON Schema's numeric exclusiveMinimum is 3.1 only)
    assert (request["strength"]["minimum"], request["strength"]["exclusiveMinimum"], request["strength"]["maximum"]) \
        == (0, True, 1)
    assert "image" in document["components"]["schemas"]["Img2ImgParameters"]["required"]


def test_every_url_the_readme_and_the_docs_name_answers(server):
    text = "\n".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    paths = sorted({path or "/" for path in re.findall(r"(?:127\.0\.0\.1|localhost):3000(/[\w./-]*)?", text)})
    assert {"/", "/docs.json", "/predict", "/txt2img", "/img2img", "/health", "/v1"} <= set(paths), paths
    paths = [path if path != "/v1" else "/v1/models" for path in paths]  # the OpenAI SDK's base_url: its models
    with server.client(follow_redirects=True) as client:
        for path in paths:
            if path in ("/predict", "/txt2img", "/img2img"):  # POST routes: what the README sends them
                start = {"image": b64(noise(256, 256))} if path == "/img2img" else {"width": 256, "height": 256}
                response = client.post(path, json={"prompt": "a kite", "num_inference_steps": 1, **start})
            else:
                response = client.get(path)
            assert response.status_code == 200, (path, response.status_code, response.text[:200])


def test_schemathesis_finds_no_disagreement_with_the_document(server, tmp_path):
    # Bounded: a fixed seed and example count, and the hooks lower valid sizes and step counts to the cheapest.
    result = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", server.url + "/docs.json", "--checks", CHECKS,
         "--max-examples", "8", "--seed", "1", "--request-timeout", "300", "--no-color", "--generation-database", "none",
         "--report-dir", str(tmp_path)],
        cwd=Path(__file__).parent, env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks"},
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"Tested: [1-9]", result.stdout), result.stdout[-3000:]


def test_the_docs_image_to_image_commands_work_as_written(server, tmp_path):
    readme = (REPO / "docs" / "api.md").read_text()
    section = readme[readme.index("## Starting from an image"):]
    script = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    script = script.replace(".venv/bin/python", sys.executable).replace("http://127.0.0.1:3000", server.url)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["images"][0]["width"], answer["images"][0]["height"]) == (512, 512)
    assert Image.open(tmp_path / "outputs" / "repainted.png").size == (512, 512)
    assert [path.name for path in tmp_path.iterdir()] == ["outputs"]  # nothing written beside it: a clone stays clean


def test_the_docs_python_client_gets_its_image(server, tmp_path):
    from integration.test_service import oci_config

    readme = (REPO / "docs" / "api.md").read_text()
    script = re.search(r"From Python.*?```python\n(.*?)```", readme, re.S)[1]
    (tmp_path / ".oci").mkdir()
    oci_config(tmp_path / ".oci")  # ~/.oci/config, as `oci setup config` writes it
    result = subprocess.run([sys.executable, "-c", f"endpoint = {server.url!r}\n" + script], cwd=tmp_path,
                            env={**os.environ, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("file://") and result.stdout.strip().endswith(".png")
