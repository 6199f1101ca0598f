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

from image_samples import b64, file_bytes
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


def test_an_error_after_the_stream_opened_is_its_last_event_and_one_before_is_a_plain_answer(server):
    not_an_image = base64.b64encode(b"these bytes are no image").decode()
    late = read_sse(server.url + "/predict", {"prompt": "a kite", "image": not_an_image, "stream": True, **SMALL})
    assert late.status == 200 and late.names()[-1] == "error", late.events
    assert late.of("error")[0]["error"]["field"] == "image"
    early = read_sse(server.url + "/predict", {"prompt": "a kite", "stream": True, "num_inference_steps": 0})
    assert early.status == 400 and early.of("json")[0]["error"]["field"] == "num_inference_steps"
    unstreamed = read_sse(server.url + "/predict", {"prompt": "a kite", "previews": 2})
    assert unstreamed.status == 400 and unstreamed.of("json")[0]["error"]["field"] == "previews"


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


def test_an_error_in_an_sdk_stream_raises_the_sdks_error(client):
    with pytest.raises(openai.APIError) as failed:
        list(client.images.edit(image=("a.png", b"not an image at all", "image/png"), prompt="a kite",
                                stream=True, extra_body={"num_inference_steps": 2}))
    assert "image" in str(failed.value)
