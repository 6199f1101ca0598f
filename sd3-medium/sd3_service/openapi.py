"""The service's OpenAPI document, made from the contract's models, and the routes that serve it.

BentoML's own document declares its generic error bodies and `text/plain` for bytes; this one declares
what the service really answers: every status a route can give, with its body and headers, and the
image media types. BentoML's infrastructure routes (`/livez`, `/readyz`, `/metrics`) are kept as it
describes them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse, RedirectResponse

from sd3_service import __version__
from sd3_service.contract import (CONTENT_TYPES, ErrorResponse, HealthResponse, ImageParameters, Img2ImgParameters,
                                  PendingResponse, PollRequest, PredictRequest, PredictResponse)

OPENAPI_VERSION = "3.0.2"
DOCUMENT_ROUTES = ("/docs.json", "/openapi.json")
DESCRIPTION = """\
Stable Diffusion 3 Medium: text to image, image to image and inpainting. `POST /predict` generates (from a
prompt, or from a starting `image`, repainting only the white area of a `mask_image` if one is sent), stores
every image (an OCI Object Storage bucket, or a local folder) and answers where each one is; `GET /health`
says whether the model is loaded. Every error is JSON `{"error": {"code", "message", "field", "problems"}}`. A request with a
`request_id` can be sent again safely, to any instance: the same id answers the first answer without
generating again. A request not done within the server's wait (or sent with `"wait": false`) is answered
202 with its status, and polled with `{"request_id": ...}` alone.
"""
_REF = "#/components/schemas/{model}"
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                                "schema": {"type": "integer", "minimum": 1}}}


def _openapi_30(schema: Any) -> Any:
    """Rewrite pydantic's JSON Schema into OpenAPI 3.0's dialect: `anyOf [X, null]` becomes X, nullable."""
    if isinstance(schema, list):
        return [_openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _openapi_30(value) for key, value in schema.items()}
    options = schema.get("anyOf")
    if options and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        del schema["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            schema.update(rest[0])
        else:  # a reference cannot carry siblings in 3.0: wrap it
            schema["allOf" if len(rest) == 1 else "anyOf"] = rest
        schema["nullable"] = True
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(schema.get(bound), (int, float)) and not isinstance(schema[bound], bool):
            schema[inclusive], schema[bound] = schema[bound], True  # 3.0 writes `> 0` as minimum 0, exclusive
    return schema


def _component(model: type[BaseModel], mode: str, schemas: dict[str, Any]) -> dict[str, str]:
    """Add `model` (and the models it uses) to `schemas`; return a reference to it."""
    schema = model.model_json_schema(ref_template=_REF, mode=mode)
    for name, nested in schema.pop("$defs", {}).items():
        schemas[name] = _openapi_30(nested)
    schemas[model.__name__] = _openapi_30(schema)
    return {"$ref": _REF.format(model=model.__name__)}


def _error(description: str, headers: dict | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": {"$ref": _REF.format(
                                    model=ErrorResponse.__name__)}}}}
    if headers:
        response["headers"] = headers
    return response


def _errors(inputs: bool = False, ledger: bool = False) -> dict[str, Any]:
    """What a generating route answers besides 200; `inputs`: it takes starting images, maybe from a bucket;
    `ledger`: it takes request ids (repeats, polls)."""
    errors = {
        "400": _error("`invalid_input` (every invalid field in `problems`) or `malformed_json`"),
        "413": _error("`payload_too_large`: the body is over the size limit (10 MB)"),
        "429": _error("`queue_full`: more requests wait than the queue holds", _RETRY_AFTER),
        "500": _error("`internal_error`: a bug; the server log has the details"),
        "503": _error("`not_ready`: the model is loading, or failed to load (see the health route)"
                      + ("; `input_unavailable`: Object Storage cannot be reached to read an `oci://` input"
                         if inputs else "")
                      + ("; `ledger_unavailable`: the request records cannot be read to answer a poll"
                         if ledger else ""), _RETRY_AFTER),
    }
    if inputs:
        errors["404"] = _error("`input_not_found`: an `oci://` input does not exist, or this deployment may not "
                               "read it; `field` names which"
                               + ("; `unknown_request`: a polled request_id was never accepted" if ledger else ""))
    if ledger:
        errors["409"] = _error("`request_id_reused`: the request_id was first sent with other parameters (`message` "
                               "names each); `request_interrupted`: its server stopped before it finished, send "
                               "the same request again")
    return dict(sorted(errors.items()))


def _json_body(reference: dict[str, str]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": reference}}}


def api_document(bentoml_paths: dict[str, Any], predict_route: str, health_route: str) -> dict[str, Any]:
    """The whole OpenAPI document; `bentoml_paths` is BentoML's own, for its infrastructure routes."""
    schemas: dict[str, Any] = {}
    _component(ErrorResponse, "serialization", schemas)
    image_bytes = {"schema": {"type": "string", "format": "binary"}}
    paths: dict[str, Any] = {
        path: copy.deepcopy(item) for path, item in bentoml_paths.items()
        if "Infrastructure" in next(iter(item.values()), {}).get("tags", [])
    }
    request_or_poll = {"oneOf": [_component(PredictRequest, "validation", schemas),
                                 _component(PollRequest, "validation", schemas)]}
    paths[predict_route] = {"post": {
        "operationId": "predict",
        "summary": "Generate images, store them, and answer where they are; or poll an earlier request",
        "description": "The same `request_id` sent again answers the first answer without generating again (with "
                       "other parameters: 409). `{\"request_id\": ...}` alone polls: 200 with the answer once "
                       "done, 202 with the status before.",
        "requestBody": _json_body(request_or_poll),
        "responses": {"200": {"description": "the generated images and where they are stored",
                              "content": {"application/json": {
                                  "schema": _component(PredictResponse, "serialization", schemas)}}},
                      "202": {"description": "accepted, not done yet (`wait: false`, or not done within the "
                                             "server's wait): poll with the request_id after `Retry-After`",
                              "headers": _RETRY_AFTER,
                              "content": {"application/json": {
                                  "schema": _component(PendingResponse, "serialization", schemas)}}},
                      **_errors(inputs=True, ledger=True)},
    }}
    paths["/txt2img"] = {"post": {
        "operationId": "txt2img",
        "summary": "Generate one image and answer its bytes (it is stored too)",
        "requestBody": _json_body(_component(ImageParameters, "validation", schemas)),
        "responses": {"200": {"description": "the image, in the requested `output_format`",
                              "headers": {"X-Request-Id": {"schema": {"type": "string"}},
                                          "X-Seed": {"schema": {"type": "integer"}}},
                              "content": {media: image_bytes for media in CONTENT_TYPES.values()}},
                      **_errors()},
    }}
    paths["/img2img"] = {"post": {
        "operationId": "img2img",
        "summary": "Repaint a starting image (only a mask's white area, with `mask_image`) and answer the image's "
                   "bytes (it is stored too)",
        "requestBody": _json_body(_component(Img2ImgParameters, "validation", schemas)),
        "responses": {"200": {"description": "the image, in the requested `output_format`",
                              "headers": {"X-Request-Id": {"schema": {"type": "string"}},
                                          "X-Seed": {"schema": {"type": "integer"}}},
                              "content": {media: image_bytes for media in CONTENT_TYPES.values()}},
                      **_errors(inputs=True)},
    }}
    health = {"content": {"application/json": {"schema": _component(HealthResponse, "serialization", schemas)}}}
    paths[health_route] = {"get": {
        "operationId": "health",
        "summary": "Whether the model is loaded and the service can generate",
        "responses": {"200": {"description": "`ready`", **health},
                      "503": {"description": "`loading` or `failed`", "headers": _RETRY_AFTER, **health}},
    }}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "SD3 Medium image generation", "version": __version__, "description": DESCRIPTION},
        "servers": [{"url": "."}],
        "paths": paths,
        "components": {"schemas": schemas},
    }


class ApiDocuments:
    """ASGI middleware: the OpenAPI document at `/docs.json` and `/openapi.json`; `/docs` leads to the API page.

    Args:
        document: makes the document (called once, on the first request for it).
    """

    def __init__(self, app, document: Callable[[], dict[str, Any]]):
        self.app = app
        self._make_document = document
        self._document: dict[str, Any] | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in DOCUMENT_ROUTES:
            if self._document is None:
                self._document = self._make_document()
            return await JSONResponse(self._document)(scope, receive, send)
        if path == "/docs":  # where FastAPI and older BentoML put the page; BentoML 1.4 serves it at /
            return await RedirectResponse("/", status_code=307)(scope, receive, send)
        return await self.app(scope, receive, send)
