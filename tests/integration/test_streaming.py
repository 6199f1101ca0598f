"""Streamed answers: SSE on `/predict` (read by a plain SSE client), OpenAI's image streams (read by the official
SDK), a dropped stream collected by its id, and Model Deployment's `/predictWithResponseStream`."""

from __future__ import annotations

import base64
import io
import json
import threading
import uuid
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from PIL import Image

from image_samples import file_bytes
from integration.test_openai import START

SMALL = {"width": 256, "height": 256, "num_inference_steps": 6, "seed": 3}


@dataclass
class Sse:
    """What a plain SSE client read from one streamed answer: its events in order, and its comments."""

    status: int = 0
    content_type: str = ""
    events: list[tuple[str, dict]] = field(default_factory=list)
    comments: int = 0
    opened: threading.Event = field(default_factory=threading.Event)
    commented: threading.Event = field(default_factory=threading.Event)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def of(self, name: str) -> list[dict]:
        return [data for seen, data in self.events if seen == name]


def read_sse(url: str, body: dict, into: Sse | None = None, headers: dict | None = None, stop_after=None) -> Sse:
    """POST `body` and read the answer as SSE, line by line, as it arrives (`stop_after(sse)`: drop the stream)."""
    sse = into or Sse()
    with httpx.stream("POST", url, json=body, timeout=120, headers=headers) as response:
        sse.status, sse.content_type = response.status_code, response.headers.get("content-type", "")
        sse.opened.set()
        if not sse.content_type.startswith("text/event-stream"):
            response.read()
            sse.events.append(("json", response.json()))
            return sse
        name, data = "message", []
        for line in response.iter_lines():
            if line.startswith(":"):
                sse.comments += 1
                sse.commented.set()
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                sse.events.append((name, json.loads("\n".join(data))))
                name, data = "message", []
            if stop_after is not None and stop_after(sse):
                return sse
    return sse


def test_predict_streams_progress_previews_keep_alives_and_the_answer_a_call_gets(server):
    gate = f"stream-{uuid.uuid4().hex[:8]}"
    body = {"prompt": server.hold(gate), "request_id": gate, "stream": True, "previews": 2, **SMALL}
    sse = Sse()
    reader = threading.Thread(target=read_sse, args=(server.url + "/predict", body, sse))
    reader.start()
    try:
        server.wait_held(gate)
        assert sse.commented.wait(60)  # held past a second: the stream said it is alive
    finally:
        server.release(gate)
    reader.join(120)
    assert sse.status == 200 and sse.content_type.startswith("text/event-stream")
    names = sse.names()
    assert names[-1] == "done" and set(names[:-1]) <= {"queued", "progress", "preview"}, names
    steps = [(data["step"], data["steps"]) for data in sse.of("progress")]
    assert steps == [(step, 6) for step in range(1, 7)], steps
    previews = sse.of("preview")
    assert [(data["index"], data["step"]) for data in previews] == [(0, 2), (1, 4)]
    assert names.index("preview") > names.index("progress")  # each after the step it shows
    preview = Image.open(io.BytesIO(base64.b64decode(previews[0]["images"][0]["data"])))
    assert preview.size == (256, 256) and previews[0]["images"][0]["content_type"] == "image/png"
    done = sse.of("done")[0]
    assert done == httpx.post(server.url + "/predict", json={"request_id": gate}, timeout=60).json()
    unstreamed = {name: value for name, value in body.items() if name not in ("stream", "previews")}
    assert done == httpx.post(server.url + "/predict", json=unstreamed, timeout=60).json()


def test_a_stream_that_drops_loses_no_work_and_the_same_id_collects_it(server):
    gate = f"dropped-{uuid.uuid4().hex[:8]}"
    body = {"prompt": server.hold(gate), "request_id": gate, "stream": True, **SMALL}
    dropped = read_sse(server.url + "/predict", body, stop_after=lambda sse: sse.status == 200)  # gone at once
    assert dropped.content_type.startswith("text/event-stream")
    server.wait_held(gate)
    server.release(gate)
    again = read_sse(server.url + "/predict", body)  # the same request again: its events from here, or its answer
    assert again.names()[-1] == "done" and again.of("done")[0]["request_id"] == gate
    assert server.log().count(f"[{gate}] Generating on") == 1


def test_a_request_refused_for_its_inputs_gets_a_plain_answer_before_any_stream_opens(server):
    not_an_image = base64.b64encode(b"these bytes are no image").decode()
    inputs = read_sse(server.url + "/predict", {"prompt": "a kite", "image": not_an_image, "stream": True, **SMALL})
    assert inputs.status == 400 and inputs.of("json")[0]["error"]["field"] == "image"
    fields = read_sse(server.url + "/predict", {"prompt": "a kite", "stream": True, "num_inference_steps": 0})
    assert fields.status == 400 and fields.of("json")[0]["error"]["field"] == "num_inference_steps"


def test_an_error_on_the_device_after_the_stream_opened_is_its_last_event(pool, adapters, tmp_path):
    from testbed.loras import with_bad_config

    # Its names and shapes fit, so the stream opens; peft cannot build the config in its header, as the device finds
    broken = with_bad_config(adapters.catalog / "wave.safetensors", tmp_path / "broken.safetensors")
    adapters.bucket.add_object("adapters", "styles/broken-streamed.safetensors", broken.read_bytes())
    body = {"prompt": "a kite", "stream": True, **SMALL,
            "loras": [{"name": "oci://adapters@tenancyns/styles/broken-streamed.safetensors"}]}
    sse = read_sse(pool.url + "/predict", body)
    assert sse.status == 200 and sse.names()[-1] == "error", sse.events
    assert sse.of("error")[0]["error"]["field"] == "loras.0"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as made:
        yield made


def test_the_sdks_image_stream_gives_partial_images_then_the_image(client):
    events = list(client.images.generate(prompt="a kite", size="256x256", stream=True, partial_images=2,
                                         extra_body={"num_inference_steps": 6, "seed": 4}))
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    final = Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json)))
    assert final.size == (256, 256) and events[-1].usage.total_tokens == 0 and events[-1].size == "256x256"
    unstreamed = client.images.generate(prompt="a kite", size="256x256",
                                        extra_body={"num_inference_steps": 6, "seed": 4})
    assert unstreamed.data[0].b64_json == events[-1].b64_json  # the same image, streamed or not


def test_the_sdks_edit_stream_and_n_images(client):
    events = list(client.images.edit(image=("a.png", file_bytes(START), "image/png"), prompt="a kite", n=2,
                                     stream=True, partial_images=1, extra_body={"num_inference_steps": 4}))
    kinds = [event.type for event in events]
    assert kinds == ["image_edit.partial_image"] + ["image_edit.completed"] * 2, kinds


def test_a_dropped_sdk_stream_is_collected_by_its_idempotency_key(client, server):
    key, gate = uuid.uuid4().hex, f"keyed-{uuid.uuid4().hex[:8]}"
    body = {"prompt": server.hold(gate), "size": "256x256", "stream": True, "num_inference_steps": 4, "seed": 2}
    dropped = read_sse(server.url + "/v1/images/generations", body, headers={"Idempotency-Key": key},
                       stop_after=lambda sse: sse.status == 200)
    assert dropped.content_type.startswith("text/event-stream")
    server.wait_held(gate)
    server.release(gate)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=5) as retrying:
        collected = retrying.images.generate(prompt=server.hold(gate), size="256x256", stream=False,
                                             extra_body={"num_inference_steps": 4, "seed": 2},
                                             extra_headers={"Idempotency-Key": key})  # its retries wait for it
    restreamed = list(client.images.generate(prompt=server.hold(gate), size="256x256", stream=True,
                                             extra_body={"num_inference_steps": 4, "seed": 2},
                                             extra_headers={"Idempotency-Key": key}))
    assert [event.type for event in restreamed] == ["image_generation.completed"]
    assert restreamed[0].b64_json == collected.data[0].b64_json
    assert server.log().count(f"[{key}] Generating on") == 1


def test_an_sdk_stream_refused_for_its_image_raises_the_sdks_error(client):
    with pytest.raises(openai.BadRequestError) as failed:
        list(client.images.edit(image=("a.png", b"not an image at all", "image/png"), prompt="a kite",
                                stream=True, extra_body={"num_inference_steps": 2}))
    assert failed.value.param == "image"


def test_an_error_in_an_open_sdk_stream_raises_the_sdks_error(pool, adapters, tmp_path):
    from testbed.loras import with_bad_config

    broken = with_bad_config(adapters.catalog / "wave.safetensors", tmp_path / "broken.safetensors")
    adapters.bucket.add_object("adapters", "styles/broken-sdk.safetensors", broken.read_bytes())
    with openai.OpenAI(base_url=pool.url + "/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.APIError) as failed:
            list(client.images.generate(prompt="a kite", size="256x256", stream=True, extra_body={
                "num_inference_steps": 2, "loras": [{"name": "oci://adapters@tenancyns/styles/broken-sdk.safetensors"}]}))
    assert "diffusers could not load this adapter" in str(failed.value)


def test_model_deployments_streaming_route_passes_the_events_on_as_they_come(server, tmp_path):
    import oci

    from testbed.fakes import oci_common
    from testbed.fakes.model_deployment import FakeModelDeployment

    credentials = oci_common.api_key(tmp_path / ".oci")
    with FakeModelDeployment(server.url) as deployment:
        deployment.trust(credentials)
        config = oci.config.from_file(str(credentials.config_file))
        client = oci.model_deployment.ModelDeploymentClient(config, service_endpoint=deployment.endpoint,
                                                            retry_strategy=oci.retry.NoneRetryStrategy())
        body = {"prompt": "a kite", "stream": True, "previews": 1, **SMALL}
        response = client.predict_with_response_stream(deployment.deployment_id, body)
        lines = list(response.data.iter_lines(decode_unicode=True))
        names = [line.removeprefix("event: ") for line in lines if line.startswith("event:")]
        assert names[-1] == "done" and "preview" in names and "progress" in names, names
        with pytest.raises(oci.exceptions.ServiceError) as unstreamed:  # the container answered plain JSON
            client.predict_with_response_stream(deployment.deployment_id, {**body, "stream": False, "previews": 0})
        assert unstreamed.value.status == 409
        calls = deployment.seen("POST", f"/{deployment.deployment_id}/predictWithResponseStream")
    assert [call.key_id == credentials.key_id for call in calls] == [True, True]


@pytest.fixture
def deployed(server, tmp_path):
    """The operator's tool, with a deployment whose routes reach the real `server` (fakes of OCI around it)."""
    from test_provisioner_cli import Cloud
    from testbed.fakes.data_science import FakeDataScience
    from testbed.fakes.model_deployment import forward_to
    from testbed.fakes.object_storage import FakeObjectStorage
    from testbed.fakes.oci_common import COMPARTMENT_ID, api_key

    credentials = api_key(tmp_path / "oci")
    storage = FakeObjectStorage(namespace="testnamespace", buckets=("images",))
    data_science = FakeDataScience(polls=1, object_storage=storage)
    for fake in (storage, data_science):
        fake.trust(credentials)
    data_science.predict_handler = lambda request, deployment: forward_to(
        server.url, request, request.path.removeprefix("/" + deployment["id"]))
    (tmp_path / "work").mkdir()
    with storage, data_science:
        model = data_science.add_model(COMPARTMENT_ID, "sd3-medium")
        deployment = data_science.add_deployment(COMPARTMENT_ID, "sd3-medium", model["id"])
        yield Cloud(data_science, storage, credentials, tmp_path / "work"), deployment["id"]


def test_the_provisioners_predict_stream_draws_its_progress_from_the_events(deployed):
    from test_provisioner_cli import ok

    cloud, deployment_id = deployed
    result = ok(cloud.run("predict", deployment_id, "--prompt", "a lighthouse", "--steps", "5", "--width", "256",
                          "--height", "256", "--request-id", "streamed-1", "--stream", timeout=120))
    answer = json.loads(result.stdout)
    assert answer["request_id"] == "streamed-1" and answer["images"][0]["width"] == 256
    assert "streamed-1: running" in result.stderr and "5/5" in result.stderr, result.stderr
    [sent] = cloud.data_science.seen("POST", f"/{deployment_id}/predictWithResponseStream")
    assert sent.json() == {"prompt": "a lighthouse", "num_inference_steps": 5, "width": 256, "height": 256,
                           "request_id": "streamed-1", "stream": True}
    assert [call.path for call in cloud.data_science.seen("POST", f"/{deployment_id}/predict")] == [sent.path]  # no polls


def test_the_docs_stream_commands_work_as_written(server, tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "streaming.md").read_text()
    curl = re.search(r"```bash\n(curl -sN .*?)```", text, re.S)[1].replace("http://127.0.0.1:3000", server.url)
    streamed = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=300)
    assert streamed.returncode == 0 and streamed.stdout.count("event: preview") == 2, streamed.stdout[-500:]
    assert "event: done" in streamed.stdout
    script = re.search(r"```python\n(.*?)```", text, re.S)[1].replace("http://127.0.0.1:3000", server.url)
    ran = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    written = sorted(path.name for path in (tmp_path / "outputs").iterdir())
    assert written == ["lighthouse.png", "partial-0.png", "partial-1.png"]
