"""The native surface's routes in the OpenAPI document: every status each one answers, with its body."""

from __future__ import annotations

from typing import Any

from sd3_service.api.documents import REF, RETRY_AFTER, Schemas, event_stream, json_body
from sd3_service.api.native.models import (ErrorResponse, HealthResponse, ImageParameters, Img2ImgParameters,
                                           PendingResponse, PollRequest, PredictRequest, PredictResponse)
from sd3_service.spec import CONTENT_TYPES

DESCRIPTION = """\
Stable Diffusion 3 Medium: text to image, image to image and inpainting. `POST /predict` generates (from a
prompt, or from a starting `image`, repainting only the white area of a `mask_image` if one is sent), stores
every image (an OCI Object Storage bucket, or a local folder) and answers where each one is; `GET /health`
says whether the model is loaded. Every error is JSON `{"error": {"code", "message", "field", "problems"}}`. A
request with a `request_id` can be sent again safely, to any instance: the same id answers the first answer
without generating again. A request not done within the server's wait (or sent with `"wait": false`) is
answered 202 with its status, and polled with `{"request_id": ...}` alone. The same engine also speaks the
OpenAI Images API under `/v1` (`POST /v1/images/generations`, `/edits`, `/variations`, `GET /v1/models`).
"""


def _error(description: str, headers: dict | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": {
        "$ref": REF.format(model=ErrorResponse.__name__)}}}}
    if headers:
        response["headers"] = headers
    return response


def _errors(inputs: bool = False, ledger: bool = False) -> dict[str, Any]:
    """What a generating route answers besides 200 (every one takes LoRA adapters); `inputs`: it takes starting
    images, maybe from a bucket; `ledger`: it takes request ids (repeats, polls)."""
    errors = {
        "400": _error("`invalid_input` (every invalid field in `problems`) or `malformed_json`"),
        "413": _error("`payload_too_large`: the body is over the size limit (10 MB)"),
        "429": _error("`queue_full`: more requests wait than the queue holds", RETRY_AFTER),
        "500": _error("`internal_error`: a bug; the server log has the details"),
        "503": _error("`not_ready`: the model is loading, or failed to load (see the health route); "
                      "`lora_unavailable`: Object Storage cannot be reached to read an `oci://` adapter"
                      + ("; `input_unavailable`: Object Storage cannot be reached to read an `oci://` input"
                         if inputs else "")
                      + ("; `ledger_unavailable`: the request records cannot be read to answer a poll"
                         if ledger else ""), RETRY_AFTER),
    }
    errors["404"] = _error("`lora_not_found`: a LoRA adapter is not in the catalog or its bucket"
                           + ("; `input_not_found`: an `oci://` input does not exist, or this deployment may not "
                              "read it" if inputs else "") + "; `field` names which"
                           + ("; `unknown_request`: a polled request_id was never accepted" if ledger else ""))
    if ledger:
        errors["409"] = _error("`request_id_reused`: the request_id was first sent with other parameters (`message` "
                               "names each); `request_interrupted`: its server stopped before it finished, send "
                               "the same request again")
    return dict(sorted(errors.items()))


def _image_answer() -> dict[str, Any]:
    image_bytes = {"schema": {"type": "string", "format": "binary"}}
    return {"description": "the image, in the requested `output_format`",
            "headers": {"X-Request-Id": {"schema": {"type": "string"}}, "X-Seed": {"schema": {"type": "integer"}}},
            "content": {media: image_bytes for media in CONTENT_TYPES.values()}}


STREAM_EVENTS = ("Server-Sent Events, each `event: <name>` and one line of JSON `data`: `queued` {request_id, "
                 "position}; `progress` {request_id, step, steps}; `preview` {request_id, index, step, steps, "
                 "images: [{content_type, data (base64)}]} when `previews` asks; then `done` (the same JSON as a "
                 "200 answer without `stream`) or `error` (the same JSON as an error answer). A `: keep-alive` "
                 "comment comes at least every 15 s.")


def native_paths(schemas: Schemas, predict_route: str, health_route: str) -> dict[str, Any]:
    """The native routes' entries of the document."""
    schemas.ref(ErrorResponse)
    request_or_poll = {"oneOf": [schemas.ref(PredictRequest, "validation"), schemas.ref(PollRequest, "validation")]}
    health = {"content": {"application/json": {"schema": schemas.ref(HealthResponse)}}}
    return {
        predict_route: {"post": {
            "operationId": "predict",
            "summary": "Generate images, store them, and answer where they are; or poll an earlier request",
            "description": "The same `request_id` sent again answers the first answer without generating again "
                           "(with other parameters: 409). `{\"request_id\": ...}` alone polls: 200 with the answer "
                           "once done, 202 with the status before.",
            "requestBody": json_body(request_or_poll),
            "responses": {"200": {"description": "the generated images and where they are stored; with `stream`, "
                                                 "the events of their making",
                                  "content": {"application/json": {"schema": schemas.ref(PredictResponse)},
                                              "text/event-stream": event_stream(STREAM_EVENTS)}},
                          "202": {"description": "accepted, not done yet (`wait: false`, or not done within the "
                                                 "server's wait): poll with the request_id after `Retry-After`",
                                  "headers": RETRY_AFTER,
                                  "content": {"application/json": {"schema": schemas.ref(PendingResponse)}}},
                          **_errors(inputs=True, ledger=True)},
        }},
        "/txt2img": {"post": {
            "operationId": "txt2img",
            "summary": "Generate one image and answer its bytes (it is stored too)",
            "requestBody": json_body(schemas.ref(ImageParameters, "validation")),
            "responses": {"200": _image_answer(), **_errors()},
        }},
        "/img2img": {"post": {
            "operationId": "img2img",
            "summary": "Repaint a starting image (only a mask's white area, with `mask_image`) and answer the "
                       "image's bytes (it is stored too)",
            "requestBody": json_body(schemas.ref(Img2ImgParameters, "validation")),
            "responses": {"200": _image_answer(), **_errors(inputs=True)},
        }},
        health_route: {"get": {
            "operationId": "health",
            "summary": "Whether the model is loaded and the service can generate",
            "responses": {"200": {"description": "`ready`", **health},
                          "503": {"description": "`loading` or `failed`", "headers": RETRY_AFTER, **health}},
        }},
    }
