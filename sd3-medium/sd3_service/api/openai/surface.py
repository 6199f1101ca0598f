"""The OpenAI Images API surface: `POST /v1/images/generations`, `/edits` and `/variations`, `GET /v1/models`.

An adapter over the engine, so that the official `openai` SDK works against the service as it is (with
`base_url=<endpoint>/v1`, or `<md endpoint>/predict/v1` through OCI Model Deployment's `openai`
specification). Images are made, named, stored and recorded exactly as `/predict` does. The
`Idempotency-Key` header is the request id: a request not done within `SYNC_WAIT_SECONDS` answers 409
with `Retry-After` and `x-should-retry: true`, so the SDK's own retries (same key) collect the one answer;
without a key it says `x-should-retry: false` and names the request id to poll on `/predict`.
`error_response` is the one place a `ServiceError` becomes OpenAI's error shape; any other path or method
under `/v1` answers it too (404, 405), so the SDK raises its own class with a message naming what is offered.
"""

from __future__ import annotations

import base64
import json
import logging
import re

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from sd3_service.api.guard import GuardedRoute, json_object, problems_of, validated, validated_body
from sd3_service.api.streaming import KEEP_ALIVE, event, event_stream
from sd3_service.api.openai.models import (WIRE_NAMES, EditForm, GenerationBody, ImageData, ImageOptions,
                                           ImagesResponse, ModelCard, ModelList, VariationForm, now, to_image_request)
from sd3_service.engine import Engine
from sd3_service.errors import Problem, ServiceError, caller_error, invalid_field, invalid_input
from sd3_service.metrics import METRICS
from sd3_service.jobs.book import Job
from sd3_service.spec import REQUEST_ID, Finished, Pending, Previewed

log = logging.getLogger("sd3")

GENERATIONS, EDITS, VARIATIONS = "/v1/images/generations", "/v1/images/edits", "/v1/images/variations"
MODELS = "/v1/models"
OFFERED = {GENERATIONS: "POST", EDITS: "POST", VARIATIONS: "POST", MODELS: "GET", MODELS + "/{model}": "GET"}
IDEMPOTENCY_KEY = "Idempotency-Key"
STARTED = now()  # `created` of the one model listed

router = APIRouter()


def error_response(error: ServiceError, request_id: str | None = None, retry: bool | None = None) -> JSONResponse:
    """`{"error": {"message", "type", "param", "code"}}`, so the SDK raises its own class (`BadRequestError`,
    `RateLimitError`, ...) with `.param` naming the field as this API names it.

    `retry`: whether the SDK should send the same request again (`x-should-retry`); by default, not after a 4xx
    other than 429 (the same call would fail the same way, and the SDK would retry a 409).
    """
    if error.code != "request_in_progress":  # an answer to come, as the native surface's 202: not an error
        METRICS.error(error.code)
    if error.status == 429:
        kind = "rate_limit_error"
    elif error.status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    param = WIRE_NAMES.get(error.field, error.field) if error.field else None
    message = error.message
    if error.field in WIRE_NAMES:  # say it in this API's words: `mask: ...`, not `mask_image: ...`
        message = re.sub(rf"\b{error.field}\b", param, message)
    headers = {}
    if error.retry_after:
        headers["Retry-After"] = str(error.retry_after)
    if retry is None:
        retry = error.status >= 500 or error.status == 429
    headers["x-should-retry"] = "true" if retry else "false"
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": error.code}},
                        status_code=error.status, headers=headers)


def guarded_routes() -> dict[str, GuardedRoute]:
    """How the guard reads this surface's bodies: JSON for generations; the edits' form is read by its route."""
    return {GENERATIONS: GuardedRoute(error_response, lambda body, headers: validated(GenerationBody,
                                                                                       json_object(body))),
            EDITS: GuardedRoute(error_response), VARIATIONS: GuardedRoute(error_response)}


def model_names(request: Request) -> tuple[str, ...]:
    """The names this surface answers to: `SERVED_MODEL_NAMES`, else the served model's id (none while loading)."""
    engine: Engine = request.app.state.engine
    served = engine.model_id()
    return getattr(request.app.state, "model_names", ()) or ((served,) if served else ())


def _card(name: str) -> ModelCard:
    return ModelCard(id=name, created=STARTED, owned_by="sd3-medium")


@router.get(MODELS)
async def models(request: Request) -> JSONResponse:
    """The names the model is served under."""
    return JSONResponse(ModelList(data=[_card(name) for name in model_names(request)]).model_dump())


@router.get(MODELS + "/{model:path}")
async def model(request: Request, model: str) -> JSONResponse:
    """One of them (OpenAI's `models.retrieve`)."""
    if model not in model_names(request):
        return error_response(_no_such_model(model, request))
    return JSONResponse(_card(model).model_dump())


@router.post(GENERATIONS)
async def generations(request: Request) -> Response:
    """Make `n` images from a prompt."""
    return await _answer(request, validated_body(request.scope))


@router.post(EDITS)
async def edits(request: Request) -> Response:
    """Repaint an image: where the mask is fully transparent with a mask (inpainting), else all of it."""
    return await _answer_form(request, EditForm)


@router.post(VARIATIONS)
async def variations(request: Request) -> Response:
    """`n` variations of an image: image to image with no prompt, at `strength`."""
    return await _answer_form(request, VariationForm)


async def _answer_form(request: Request, model: type[ImageOptions]) -> Response:
    try:
        options, image, mask = await _image_form(request, model)
    except ServiceError as exc:
        return error_response(exc)
    return await _answer(request, options, image, mask)


@router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                  include_in_schema=False)
async def elsewhere(request: Request, rest: str) -> JSONResponse:
    """Any other path or method under /v1: OpenAI's error shape, naming what this server offers."""
    return not_offered(request.method, request.url.path)


def not_offered(method: str, path: str) -> JSONResponse:
    offered = ", ".join(f"{method} {route}" for route, method in OFFERED.items())
    if path in OFFERED:
        error = ServiceError(405, "method_not_allowed", f"{path} takes {OFFERED[path]}, not {method}; this server "
                                                        f"offers {offered}")
    else:
        error = ServiceError(404, "not_found", f"{method} {path!r} is not offered here; this server offers "
                                               f"{offered}")
    return error_response(error)


def unroutable(scope: dict) -> JSONResponse | None:
    """A path under /v1 with a control character, which no route's pattern matches (they stop at a line break):
    answered here, in OpenAI's shape, instead of the server's plain-text 404."""
    path = scope.get("path", "")
    if path.startswith("/v1/") and any(character < " " or character == "\x7f" for character in path):
        return not_offered(scope["method"], path)
    return None


async def _answer(request: Request, options: ImageOptions, image: bytes | None = None,
                  mask: bytes | None = None) -> Response:
    engine: Engine = request.app.state.engine
    request_id = None
    try:
        request_id = _idempotency_key(request)
        _check_model(options, request)
        if options.response_format == "url" and not engine.writer.makes_links():
            raise invalid_field("response_format", "'url' needs a deployment that makes links (RETURN_URL=true "
                                                   "with an Object Storage bucket); use b64_json")
        if getattr(options, "stream", False):
            started = await engine.accept(to_image_request(options, request_id, image, mask))
            await engine.prepared(started)
            return _stream(request, engine, started, options, "image_generation" if mask is None and image is None
                           else "image_edit")
        outcome = await engine.run(to_image_request(options, request_id, image, mask))
        if isinstance(outcome, Pending):  # with a key, the SDK's own retry collects it; without, it must not retry
            return error_response(_in_progress(outcome, keyed=request_id is not None), outcome.request_id,
                                  retry=request_id is not None)
        request_id = outcome.answer.request_id
        body = await _images_response(engine, outcome, options)
    except Exception as exc:  # noqa: BLE001 - every failure answers in OpenAI's shape (a bug: logged, 500)
        return error_response(caller_error(exc, log), request_id)
    # pydantic's own serializer: megabytes of base64 go out without Python's json scanning them again
    return Response(body.model_dump_json(), media_type="application/json", headers={"x-request-id": request_id})


async def _images_response(engine: Engine, finished: Finished, options: ImageOptions) -> ImagesResponse:
    images = finished.answer.images
    if options.response_format == "url" and all(image.url for image in images):
        data = [ImageData(url=image.url) for image in images]
    else:  # b64_json; or a link the store could not make (it was down): the image itself, never nothing. A link
        # the deployment made rides beside it, for clients that read `url` without asking for it (DALL-E's default)
        data = [ImageData.model_construct(b64_json=base64.b64encode(file).decode("ascii"), url=image.url)
                for file, image in zip(await engine.image_bytes(finished), images, strict=True)]
    first = images[0]
    return ImagesResponse(created=now(), data=data, output_format=options.output_format,
                          size=f"{first.width}x{first.height}")


QUALITIES = {"standard": "medium", "hd": "high", None: "auto"}  # the quality names a stream's events may carry
NO_TOKENS = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
             "total_tokens": 0}  # this model counts no tokens


def _stream(request: Request, engine: Engine, started: Finished | Job, options: ImageOptions,
            kind: str) -> Response:
    """OpenAI's image stream: `<kind>.partial_image` events (the first image's estimates), then one
    `<kind>.completed` event per image; an error after it opened is an event with OpenAI's error body."""
    request_id = started.answer.request_id if isinstance(started, Finished) else started.request_id
    described = {"background": options.background or "auto", "output_format": options.output_format,
                 "quality": QUALITIES.get(options.quality, options.quality)}

    async def events():
        try:
            async for news in engine.follow(started, request.app.state.keepalive_seconds):
                if isinstance(news, Previewed):
                    first = news.files[0]
                    yield event(None, json.dumps({
                        "type": f"{kind}.partial_image", "partial_image_index": news.index,
                        "b64_json": base64.b64encode(first.data).decode(), "created_at": now(),
                        "size": f"{first.width}x{first.height}", **described}))
                elif isinstance(news, Finished):
                    size = f"{news.answer.images[0].width}x{news.answer.images[0].height}"
                    for file in await engine.image_bytes(news):
                        yield event(None, json.dumps({
                            "type": f"{kind}.completed", "b64_json": base64.b64encode(file).decode(),
                            "created_at": now(), "size": size, "usage": NO_TOKENS, **described}))
                else:  # queued, steps, silence: OpenAI's stream has no such events; a comment keeps it open
                    yield KEEP_ALIVE
        except Exception as exc:  # noqa: BLE001 - the stream is open: the error is its last event
            failed = error_response(caller_error(exc, log), request_id)
            yield event("error", failed.body.decode())

    return event_stream(events(), {"x-request-id": request_id})


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is not None and not re.fullmatch(REQUEST_ID, key):
        raise ServiceError(400, "invalid_input", f"the {IDEMPOTENCY_KEY} header must match {REQUEST_ID} (1 to 64 "
                                                 "letters, digits, '_' or '-'), such as a UUID4's hex",
                           field=IDEMPOTENCY_KEY)
    return key


def _check_model(options: ImageOptions, request: Request) -> None:
    if options.model is not None and options.model not in model_names(request):
        raise _no_such_model(options.model, request)


def _no_such_model(name: str, request: Request) -> ServiceError:
    served = ", ".join(f"`{name}`" for name in model_names(request)) or "none while the model loads"
    return ServiceError(404, "model_not_found", f"The model `{name}` does not exist; this deployment serves {served} "
                                                "(GET /v1/models)", field="model")


def _in_progress(pending: Pending, keyed: bool) -> ServiceError:
    """Not done within `SYNC_WAIT_SECONDS`: with a key, a retryable 409 that the SDK's retries collect."""
    if keyed:
        message = (f"the image is still being made ({pending.status}); sending the same request with the same "
                   f"{IDEMPOTENCY_KEY} collects it without making it again")
    else:
        message = (f"the image is still being made as request '{pending.request_id}': poll it with POST /predict "
                   f"{{\"request_id\": \"{pending.request_id}\"}}, and send an {IDEMPOTENCY_KEY} header next time "
                   "so that a retry collects the answer instead of making another image")
    return ServiceError(409, "request_in_progress", message, retry_after=pending.retry_after)


def _json_field(name: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise invalid_field(name, "not JSON: send a list such as [{\"name\": \"ink\", \"scale\": 0.8}]") from None


def _by_position(parts: dict[str, list]) -> list[dict]:
    """Unnumbered adapter parts as adapters: the i-th value of each part is the i-th adapter's; 400 when a part is
    missing for some adapters, since it cannot be told which."""
    count = max((len(values) for values in parts.values()), default=0)
    for key, values in parts.items():
        if len(values) != count:
            raise invalid_field("loras", f"the form has {count} adapters but {len(values)} loras[][{key}]: give "
                                         f"every adapter its {key} (in extra_body), or number them as "
                                         f"loras[0][{key}]")
    return [{key: values[index] for key, values in parts.items()} for index in range(count)]


LORA_FORM_PART = re.compile(r"^loras\[(\d{0,2})\]\[(\w+)\]$")


async def _image_form(request: Request, model: type[ImageOptions]) -> tuple[ImageOptions, bytes, bytes | None]:
    """An edit's or variation's form: its one image, its mask (if any; edits only), and its fields as `model`."""
    try:
        form = await request.form()
    except Exception as exc:  # noqa: BLE001 - Starlette's parser raises several kinds for a bad body
        raise ServiceError(400, "malformed_form", f"the body is not a multipart form: {exc}", field="body") from None
    images = form.getlist("image") + form.getlist("image[]")
    fields: dict = {}
    numbered: dict[int, dict] = {}  # loras[0][name], loras[0][scale]: grouped by their number, in any order
    # The SDK's `extra_body={"loras": [...]}` sends loras[][name] for every adapter, then loras[][scale] for every
    # one that has it: the i-th value of each part belongs to the i-th adapter.
    unnumbered: dict[str, list] = {}
    for name, value in form.multi_items():
        if name in ("image", "image[]") or (name == "mask" and model is EditForm):
            continue
        if name == "markup" and model is EditForm:
            raise invalid_field(name, "markup images are not taken here: draw the area to change as a `mask`")
        if isinstance(value, UploadFile):
            raise invalid_field(name, "must be a form field, not a file")
        if part := LORA_FORM_PART.match(name):
            number, key = part.groups()
            if number:
                numbered.setdefault(int(number), {})[key] = value
            else:
                unnumbered.setdefault(key, []).append(value)
        elif name == "loras":  # or the list as JSON text, as curl -F sends it
            fields[name] = _json_field(name, value)
        else:
            fields[name] = value
    if numbered or unnumbered:
        fields["loras"] = [numbered[number] for number in sorted(numbered)] + _by_position(unnumbered)
    problems: list[Problem] = []
    if not images:
        problems.append(Problem("image", "'image' is required: the image to edit, as a file"))
    elif len(images) > 1:
        problems.append(Problem("image", f"image: {len(images)} images were sent; this model edits one image"))
    elif not isinstance(images[0], UploadFile):
        problems.append(Problem("image", "image: must be a file (a PNG, JPEG or WebP)"))
    mask = form.get("mask") if model is EditForm else None
    if mask is not None and not isinstance(mask, UploadFile):
        problems.append(Problem("mask", "mask: must be a file (a PNG whose transparent pixels mark where to edit)"))
    try:
        options = model.model_validate(fields)
    except ValidationError as exc:
        problems += problems_of(exc)
        options = None
    if problems:
        raise invalid_input(problems, allowed=["image", *(["mask"] if model is EditForm else []), *model.model_fields])
    return options, await images[0].read(), None if mask is None else await mask.read()
