"""The native API surface: `POST /predict` (requests and polls), `POST /txt2img`, `POST /img2img`, `GET /health`.

An adapter over the engine: the guard validates each body with the wire models (`models.py`), the
handlers here hand the engine an `ImageRequest` and turn what it answers into HTTP, and
`error_response` is the one place a `ServiceError` becomes this surface's error body. BentoML serves the
POST routes (`service.py` declares them with the schema-only models below, so BentoML's own client can
call them); the health route is plain.
"""

from __future__ import annotations

import base64
import json
import logging

from starlette.responses import JSONResponse, Response

from sd3_service.api.guard import GuardedRoute, json_object, validated
from sd3_service.api.streaming import KEEP_ALIVE, event, event_stream
from sd3_service.api.native.models import (ImageParameters, Img2ImgParameters, PendingResponse, PollRequest,
                                           PredictRequest, PredictResponse, schema_only, to_image_request)
from sd3_service.engine import Engine
from sd3_service.errors import ServiceError, caller_error
from sd3_service.metrics import METRICS
from sd3_service.spec import Finished, KeepAlive, Pending, Previewed, Queued, Stepped

# What BentoML declares for each route: the fields, none of the checks (the guard's models do those, once).
log = logging.getLogger("sd3")

PredictInput = schema_only("PredictInput", PredictRequest)  # a poll has no prompt
Txt2ImgInput = schema_only("Txt2ImgInput", ImageParameters, optional=frozenset())
Img2ImgInput = schema_only("Img2ImgInput", Img2ImgParameters, optional=frozenset())
PredictOutput = schema_only("PredictOutput", PredictResponse, PendingResponse)  # 200, or 202 with the status


def error_response(error: ServiceError) -> JSONResponse:
    """`{"error": {"code", "message", "field", "problems"}}` with the status, and `Retry-After` when it applies."""
    METRICS.error(error.code)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


def error_body(error: ServiceError) -> dict:
    body: dict = {"code": error.code, "message": error.message, "field": error.field}
    if error.problems is not None:
        body["problems"] = [{"field": problem.field, "message": problem.message} for problem in error.problems]
    return {"error": body}


def predict_body(body: bytes, headers: dict[str, str]) -> PredictRequest | PollRequest:
    """`{"request_id": ...}` alone polls; any other body is a request, and needs a prompt."""
    payload = json_object(body)
    return validated(PollRequest if set(payload) == {"request_id"} else PredictRequest, payload)


def guarded_routes(predict_route: str) -> dict[str, GuardedRoute]:
    """How the guard reads this surface's bodies: JSON, validated by the wire models."""
    def body_of(model):
        return lambda body, headers: validated(model, json_object(body))

    return {predict_route: GuardedRoute(error_response, predict_body, as_json=True),
            "/txt2img": GuardedRoute(error_response, body_of(ImageParameters), as_json=True),
            "/img2img": GuardedRoute(error_response, body_of(Img2ImgParameters), as_json=True)}


async def predict(engine: Engine, sent: PredictRequest | PollRequest, keepalive_seconds: float = 15) -> Response:
    """Generate (or answer a repeat, or poll): 200 with the answer, 202 with the status, or the error; with
    `stream`, the events of its making (`stream`)."""
    if isinstance(sent, PredictRequest) and sent.stream:
        return await stream(engine, sent, keepalive_seconds)
    try:
        if isinstance(sent, PollRequest):
            outcome = await engine.poll(sent.request_id)
        else:
            outcome = await engine.run(to_image_request(sent))
    except Exception as exc:  # noqa: BLE001 - every failure answers in the contract's shape (a bug: logged, 500)
        return error_response(caller_error(exc, log))
    if isinstance(outcome, Pending):
        return JSONResponse(PendingResponse.of(outcome).model_dump(mode="json"), status_code=202,
                            headers={"Retry-After": str(outcome.retry_after)})
    return JSONResponse(outcome.answer.model_dump(mode="json"))


async def stream(engine: Engine, sent: PredictRequest, keepalive_seconds: float) -> Response:
    """`text/event-stream`: `queued`, `progress`, `preview`, then `done` with the answer or `error` with the error
    body. A request refused before it is accepted, or for its inputs or adapters, gets its plain error answer instead
    (no stream opens); what fails later (on the device) is the stream's `error` event."""
    try:
        started = await engine.accept(to_image_request(sent))
        await engine.prepared(started)
    except Exception as exc:  # noqa: BLE001
        return error_response(caller_error(exc, log))
    request_id = started.answer.request_id if isinstance(started, Finished) else started.request_id

    async def events():
        try:
            async for news in engine.follow(started, keepalive_seconds):
                if isinstance(news, KeepAlive):
                    yield KEEP_ALIVE
                elif isinstance(news, Queued):
                    yield event("queued", json.dumps({"request_id": request_id, "position": news.position}))
                elif isinstance(news, Stepped):
                    yield event("progress", json.dumps({"request_id": request_id, "step": news.step,
                                                        "steps": news.steps}))
                elif isinstance(news, Previewed):
                    images = [{"content_type": file.content_type, "data": base64.b64encode(file.data).decode()}
                              for file in news.files]
                    yield event("preview", json.dumps({"request_id": request_id, "index": news.index,
                                                       "step": news.step, "steps": news.steps, "images": images}))
                else:
                    yield event("done", JSONResponse(news.answer.model_dump(mode="json")).body.decode())
        except Exception as exc:  # noqa: BLE001 - the stream is open: the error is its last event
            error = caller_error(exc, log)
            METRICS.error(error.code)
            yield event("error", json.dumps(error_body(error)))

    return event_stream(events(), {"X-Request-Id": request_id})


async def image(engine: Engine, sent: ImageParameters) -> Response:
    """`/txt2img` and `/img2img`: wait to the end and answer the first image's bytes."""
    try:
        finished: Finished = await engine.run(to_image_request(sent), wait_to_end=True)
        data = (await engine.image_bytes(finished))[0]
    except Exception as exc:  # noqa: BLE001
        return error_response(caller_error(exc, log))
    stored = finished.answer.images[0]
    return Response(content=data, media_type=stored.content_type,
                    headers={"X-Request-Id": finished.answer.request_id, "X-Seed": str(finished.answer.seed)})


def health(engine: Engine) -> JSONResponse:
    health = engine.health()
    if health.status == "ready":
        return JSONResponse(health.details)
    return JSONResponse(health.details, status_code=503, headers={"Retry-After": "10"})
