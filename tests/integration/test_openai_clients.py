"""The OpenAI surface as the clients people point at image servers call it: every field of the pinned `openai`
SDK's image requests, `null` for a default, variations, the names the model answers to, routes it does not offer,
LiteLLM, and the bodies two chat front-ends send (read from their sources)."""

from __future__ import annotations

import base64
import io
import os

import httpx
import openai
import pytest
from PIL import Image

from image_samples import file_bytes
from integration.test_openai import FAST, START, decoded, transparent_left_half

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its price list on import


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as made:
        yield made


def test_what_dall_e_3_and_gpt_image_clients_add_is_taken_and_null_is_the_default(client, server):
    taken = client.images.generate(prompt="a kite", size="256x256", style="vivid", moderation="low", n=None,
                                   quality=None, complexity="high", frame_count=1, frame_duration_ms=40,
                                   partial_images=0, safety_identifier="user-42", background="opaque",
                                   output_compression=None, extra_body=FAST)
    assert [decoded(image).size for image in taken.data] == [(256, 256)]
    # every optional field null, as some clients serialize what they leave unset: each takes its default
    nulls = {name: None for name in ("model", "n", "quality", "response_format", "output_format", "style", "user",
                                     "background", "moderation", "output_compression", "seed", "negative_prompt")}
    answer = httpx.post(server.url + "/v1/images/generations", timeout=120,
                        json={"prompt": "a kite", "size": "256x256", "num_inference_steps": 2, **nulls})
    assert answer.status_code == 200, answer.text
    assert answer.json()["output_format"] == "png" and len(answer.json()["data"]) == 1
    native = httpx.post(server.url + "/predict", timeout=120, json={
        "prompt": "a kite", "width": 256, "height": 256, "num_inference_steps": 2, "seed": None, "num_images": None,
        "negative_prompt": None, "guidance_scale": None, "output_format": None, "request_id": None})
    assert native.status_code == 200 and len(native.json()["images"]) == 1, native.text


REFUSED = {
    "more than one frame": ({"frame_count": 2}, "frame_count", "still images"),
    "a GIF": ({"output_format": "gif"}, "output_format", "png, jpeg or webp"),
    "an SVG": ({"output_format": "svg"}, "output_format", "png, jpeg or webp"),
    "a transparent background": ({"background": "transparent"}, "background", "opaque"),
    "more partial images than OpenAI allows": ({"partial_images": 4}, "partial_images", "3"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_what_this_model_cannot_do_is_refused_naming_the_field(client, case):
    fields, param, said = REFUSED[case]
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="a kite", size="256x256", extra_body=FAST, **fields)
    assert refused.value.param == param and said in refused.value.message, refused.value.body


def test_dall_e_3_sizes_are_made_at_the_nearest_shape_this_model_draws(client):
    wide = client.images.generate(prompt="a kite", size="1792x1024", extra_body=FAST)
    assert wide.size == "1536x880" and decoded(wide.data[0]).size == (1536, 880)


def test_an_edit_with_markup_or_a_gpt_image_field_is_answered_by_name(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=("a.png", file_bytes(START), "image/png"), prompt="a kite", extra_body=FAST,
                           markup=("m.png", file_bytes(START), "image/png"))
    assert refused.value.param == "markup", refused.value.body
    edited = client.images.edit(image=("a.png", file_bytes(START), "image/png"), prompt="a kite", n=None,
                                input_fidelity="high", quality="low", extra_body=FAST)
    assert decoded(edited.data[0]).size == START.size


def test_variations_redraw_the_image_alone_n_times(client, server):
    image = ("start.png", file_bytes(START), "image/png")
    made = client.images.create_variation(image=image, n=2, size="256x256",
                                          extra_body={"num_inference_steps": 4, "seed": 9})
    assert [decoded(data).size for data in made.data] == [(256, 256)] * 2
    again = client.images.create_variation(image=image, n=2, size="256x256",
                                           extra_body={"num_inference_steps": 4, "seed": 9})
    assert [data.b64_json for data in again.data] == [data.b64_json for data in made.data]  # as seeded
    redrawn = client.images.create_variation(image=image, n=1, size="256x256",
                                             extra_body={"num_inference_steps": 4, "seed": 9, "strength": 1.0})
    assert redrawn.data[0].b64_json != made.data[0].b64_json  # strength is taken, as on edits
    own_size = client.images.create_variation(image=image, extra_body=FAST)
    assert decoded(own_size.data[0]).size == START.size  # no size: the image's own
    with pytest.raises(openai.BadRequestError) as masked:
        client.images.create_variation(image=image, extra_body=FAST | {"prompt": "a kite"})
    assert masked.value.param == "prompt", masked.value.body  # a variation has no prompt; an edit has


def test_routes_not_offered_answer_openais_error_shape_naming_what_is_offered(client, server):
    with pytest.raises(openai.NotFoundError) as missing:
        client.files.list()
    assert missing.value.code == "not_found" and "POST /v1/images/generations" in missing.value.message
    wrong_method = httpx.get(server.url + "/v1/images/generations")
    assert wrong_method.status_code == 405, wrong_method.text
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert "takes POST" in wrong_method.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as status:
        client.post("/images/generations/extra", cast_to=httpx.Response, body={})
    assert status.value.status_code == 404 and status.value.body["code"] == "not_found"
    line_break = httpx.get(server.url + "/v1/models/a%0Ab")  # no route's pattern matches it
    assert line_break.status_code == 404 and line_break.json()["error"]["code"] == "not_found", line_break.text


def test_served_model_names_are_listed_retrievable_and_answered_to(client):
    # `server` answers to SERVED_MODEL_NAMES=sd3-tiny,dall-e-3
    assert [model.id for model in client.models.list()] == ["sd3-tiny", "dall-e-3"]
    assert client.models.retrieve("dall-e-3").id == "dall-e-3"
    # LibreChat's DALL-E 3 tool, with its defaults: model, quality, style, size, prompt and n, no response_format
    made = client.images.generate(model="dall-e-3", quality="standard", style="vivid", size="1024x1024",
                                  prompt="a lighthouse at dusk", n=1, response_format="b64_json")
    assert decoded(made.data[0]).size == (1024, 1024)
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="gpt-image-1", prompt="a kite", size="256x256", extra_body=FAST)


def test_open_webuis_request_is_answered(server):
    # What Open WebUI's image router posts to an OpenAI-compatible engine:
    # model, prompt, n, size (its default 512x512) and response_format b64_json.
    body = {"model": "sd3-tiny", "prompt": "a lighthouse at dusk", "n": 1, "size": "512x512",
            "response_format": "b64_json"}
    answer = httpx.post(server.url + "/v1/images/generations", json=body, timeout=120,
                        headers={"Authorization": "Bearer unused"})
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    assert image.size == (512, 512)


def test_litellm_generates_and_edits(server):
    import litellm

    made = litellm.image_generation(model="openai/sd3-tiny", prompt="a kite", size="256x256", n=1,
                                    api_base=server.url + "/v1", api_key="unused", num_inference_steps=2, seed=3)
    assert Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json))).size == (256, 256)
    # LiteLLM sends the edit's image as `image[]`, and its mask as OpenAI's transparent-means-edit PNG
    edited = litellm.image_edit(model="openai/sd3-tiny", prompt="a kite", image=file_bytes(START),
                                mask=transparent_left_half(*START.size), api_base=server.url + "/v1",
                                api_key="unused", extra_body={"num_inference_steps": 2, "seed": 3})
    pixels = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).convert("RGB")
    assert pixels.size == START.size
    right = (START.width // 2, 0, START.width, START.height)
    assert pixels.crop(right).tobytes() == START.convert("RGB").crop(right).tobytes()  # the mask's opaque half
