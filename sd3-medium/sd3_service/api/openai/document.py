"""The OpenAI surface's routes in the OpenAPI document."""

from __future__ import annotations

from typing import Any

from sd3_service.api.documents import REF, RETRY_AFTER, Schemas, event_stream, json_body
from sd3_service.api.openai.models import (EditForm, GenerationBody, ImagesResponse, ModelCard, ModelList,
                                           OpenAIErrorResponse, VariationForm)
from sd3_service.api.openai.surface import EDITS, GENERATIONS, IDEMPOTENCY_KEY, MODELS, VARIATIONS

_KEY = {"name": IDEMPOTENCY_KEY, "in": "header", "required": False,
        "description": "the request id (`[A-Za-z0-9_-]{1,64}`): the same key answers the first answer without "
                       "making the images again, on any instance; with other parameters: 409",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}
_REQUEST_ID = {"x-request-id": {"description": "the request id (the Idempotency-Key, or one the server made)",
                                "schema": {"type": "string"}}}
_SHOULD_RETRY = {"x-should-retry": {"description": "`false` when sending the same request again cannot help",
                                    "schema": {"type": "string", "enum": ["true", "false"]}}}


STREAM_EVENTS = ("Server-Sent Events as the openai SDK's `stream=True` reads them: `partial_images` events of type "
                 "`image_generation.partial_image` (`image_edit.partial_image`) with `partial_image_index` and "
                 "`b64_json`, then one `image_generation.completed` (`image_edit.completed`) per image with "
                 "`b64_json`, `size`, `output_format`, `quality`, `background` and `usage` (zero: no tokens are "
                 "counted); an error after the stream opened is an `error` event with OpenAI's error body.")


def _error(description: str, headers: dict | None = None) -> dict[str, Any]:
    return {"description": description, "headers": {**_SHOULD_RETRY, **(headers or {})},
            "content": {"application/json": {"schema": {"$ref": REF.format(model=OpenAIErrorResponse.__name__)}}}}


def _errors() -> dict[str, Any]:
    return {
        "400": _error("`invalid_input` (`param` names the field), `malformed_json`, `malformed_form`"),
        "404": _error("`model_not_found`: `model` names another model; `lora_not_found`, `input_not_found`"),
        "409": _error("`request_in_progress`: not done within the server's wait; with an Idempotency-Key, the same "
                      "request again collects it (`Retry-After`); `request_id_reused`: the key was first sent with "
                      "other parameters", RETRY_AFTER),
        "410": _error("`image_gone`: a repeat's (the same Idempotency-Key) image is no longer in the store (a "
                      "lifecycle rule removed it); the message names the request id"),
        "413": _error("`payload_too_large`: the body is over the size limit (10 MB)"),
        "429": _error("`queue_full`: more requests wait than the queue holds", RETRY_AFTER),
        "500": _error("`internal_error`: a bug; the server log has the details"),
        "503": _error("`not_ready`: the model is loading, or failed to load; `lora_unavailable`: an `oci://` adapter "
                      "cannot be read now; `store_unavailable`: a repeat's image cannot be read back from the store "
                      "now", RETRY_AFTER),
    }


def _form(model, schemas: Schemas, links: bool) -> dict[str, Any]:
    reference = schemas.ref(model, "validation")
    form = schemas.components[model.__name__]
    for field in form["properties"].values():
        field.pop("nullable", None)  # a form field is sent, or not: it has no null
    if not links:
        form["properties"]["response_format"]["enum"] = ["b64_json"]
    files = {"image": {"type": "string", "format": "binary", "description": "the image: a PNG, JPEG or WebP file, "
                                                                            "256 to 1536 pixels a side"}}
    if model is EditForm:
        files["mask"] = {"type": "string", "format": "binary", "description": "a PNG of the image's size whose fully "
                                                                             "transparent pixels mark the area to "
                                                                             "edit; without it the whole image is "
                                                                             "repainted"}
    form["properties"] = {**files, **form["properties"]}
    form["required"] = ["image", *form.get("required", [])]
    return reference


def _links_only_if(links: bool, schemas: Schemas, reference: dict) -> dict:
    """The model's schema, with `response_format: url` only where the deployment makes links."""
    if not links:
        name = reference["$ref"].rsplit("/", 1)[1]
        schemas.components[name]["properties"]["response_format"]["enum"] = ["b64_json"]
    return reference


def openai_paths(schemas: Schemas, links: bool) -> dict[str, Any]:
    """The OpenAI routes' entries of the document; `links`: whether this deployment answers `url`s."""
    schemas.ref(OpenAIErrorResponse)
    answer = {"description": "the images: `b64_json` or `url` each; with `stream`, OpenAI's image stream",
              "headers": _REQUEST_ID,
              "content": {"application/json": {"schema": schemas.ref(ImagesResponse)},
                          "text/event-stream": event_stream(STREAM_EVENTS)}}
    return {
        GENERATIONS: {"post": {
            "operationId": "openai_images_generations", "tags": ["OpenAI Images API"],
            "summary": "Make images from a prompt (OpenAI's `images.generate`)",
            "parameters": [_KEY],
            "requestBody": json_body(_links_only_if(links, schemas, schemas.ref(GenerationBody, "validation"))),
            "responses": {"200": answer, **_errors()},
        }},
        EDITS: {"post": {
            "operationId": "openai_images_edits", "tags": ["OpenAI Images API"],
            "summary": "Repaint an image, only where a mask is transparent if one is sent (OpenAI's `images.edit`)",
            "parameters": [_KEY],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _form(EditForm, schemas,
                                                                                                  links)}}},
            "responses": {"200": answer, **_errors()},
        }},
        VARIATIONS: {"post": {
            "operationId": "openai_images_variations", "tags": ["OpenAI Images API"],
            "summary": "Variations of an image, with no prompt (OpenAI's `images.create_variation`)",
            "parameters": [_KEY],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _form(VariationForm,
                                                                                                  schemas, links)}}},
            "responses": {"200": answer, **_errors()},
        }},
        MODELS: {"get": {
            "operationId": "openai_models", "tags": ["OpenAI Images API"],
            "summary": "The names the model is served under (OpenAI's `models.list`)",
            "responses": {"200": {"description": "`SERVED_MODEL_NAMES`, or the served model's id",
                                  "content": {"application/json": {"schema": schemas.ref(ModelList)}}}},
        }},
        MODELS + "/{model}": {"get": {
            "operationId": "openai_model", "tags": ["OpenAI Images API"],
            "summary": "One of those names (OpenAI's `models.retrieve`)",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the model",
                                  "content": {"application/json": {"schema": schemas.ref(ModelCard)}}},
                          "404": _error("`model_not_found`: not a name this deployment serves")},
        }},
    }
