"""SD3 Medium image generation, served by BentoML: `POST /predict`, `GET /health`, `POST /txt2img`, `POST /img2img`.

This file is routing and wiring only: the engine (`sd3_service/engine.py`) takes a request through the
jobs, the ledger, the device pool and the image writer; here its states become HTTP statuses.
docs/architecture.md describes the pieces.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys

import bentoml
from fastapi import FastAPI
from starlette.responses import JSONResponse, Response

from pydantic import BaseModel, ConfigDict

from sd3_service.contract import (Img2ImgParameters, ImageParameters, PendingResponse, PollRequest, PredictRequest,
                                  PredictResponse)
from sd3_service.device_pool import DevicePool, NotReady, QueueFull
from sd3_service.engine import Engine, RequestProblem
from sd3_service.jobs import JobBook
from sd3_service.ledger import Ledger
from sd3_service.records import LocalRecords
from sd3_service.http_errors import RequestGuard, error_response, validated_body
from sd3_service.image_writer import ImageWriter
from sd3_service.inputs import InputError, InputReader
from sd3_service.model_loading import load_weights, place_pipeline, resolve_devices
from sd3_service.openapi import ApiDocuments, api_document
from sd3_service.settings import Settings

SETTINGS = Settings()  # read once at start-up; routes depend on it
log = logging.getLogger("sd3")
if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

PREDICT_ROUTE = SETTINGS.model_deploy_predict_endpoint
HEALTH_ROUTE = SETTINGS.model_deploy_health_endpoint
# GET routes (BentoML's own APIs are POST-only); BentoML serves the API page, so FastAPI serves none.
routes = FastAPI(title="health", docs_url=None, redoc_url=None, openapi_url=None)


def find_devices(settings: Settings) -> list[str]:
    import torch  # slow to import: the pool calls this on its loading thread, once the server answers

    return resolve_devices(settings.sd3_device, torch.cuda.device_count())


def build_engine(settings: Settings) -> Engine:
    """The engine as the settings describe it: devices, model, store."""
    pool = DevicePool(find_devices=lambda: find_devices(settings),
                      load_weights=lambda devices: load_weights(settings, devices),
                      place=lambda weights, device, copy: place_pipeline(weights, device, settings, copy),
                      max_queue=settings.max_queue)
    writer = ImageWriter.from_settings(settings)
    return Engine(pool, writer, JobBook(settings.idempotency_cache_size), ledger=build_ledger(settings, writer),
                  inputs=input_reader(settings, writer), sync_wait_seconds=settings.sync_wait_seconds,
                  max_jobs=settings.max_jobs, keep_text=settings.store_params)


def build_ledger(settings: Settings, writer: ImageWriter) -> Ledger:
    """The request records, beside the images: in the bucket, or in the local image folder."""
    store = writer.store.store
    records = store if hasattr(store, "create_record") else LocalRecords(settings.image_dir)
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    return Ledger(records, settings.object_prefix, settings.lease_seconds, owner)


def input_reader(settings: Settings, writer: ImageWriter) -> InputReader:
    """Reads `oci://` inputs with the image store's own client when there is one, else with one of its own."""
    allowed = settings.allowed_input_buckets
    if not allowed:
        return InputReader()
    from sd3_service.object_storage import ObjectStorageStore

    store = writer.store.store
    return InputReader(allowed, store if isinstance(store, ObjectStorageStore) else
                       ObjectStorageStore.from_settings(settings))


def as_sent() -> PredictRequest | PollRequest:
    """The request as the client sent it, as the guard validated it: BentoML passes every field, defaults included,
    but which were sent matters (an input image sets the output size only where none was sent)."""
    # The request being served, from BentoML's context (a `ctx` parameter would have BentoML overwrite the
    # status of every Response a route returns with the context's, 200).
    sent = validated_body(SD3Medium.context.request.scope)
    if isinstance(sent, (PredictRequest, PollRequest)):
        return sent
    # /txt2img, /img2img: fewer of the same fields, validated by the same rules already (so not again: an image
    # field of 10 MB takes ~50 ms to check), with the rest at their defaults.
    return PredictRequest.model_construct(_fields_set=sent.model_fields_set, **dict(sent))


def predict_body(payload: dict) -> type[BaseModel]:
    """`{"request_id": ...}` alone polls; any other body is a request, and needs a prompt."""
    return PollRequest if set(payload) == {"request_id"} else PredictRequest


class AnyObject(BaseModel):
    """What BentoML parses `/predict`'s body as: any JSON object (the guard has validated it already, as a request
    or a poll, which one model cannot say)."""

    model_config = ConfigDict(extra="allow")


@bentoml.service(
    name="sd3-medium",
    traffic={"timeout": 300},  # our own queue bound answers 429 long before this
    # No `resources={"gpu": N}`: BentoML would then give the worker CUDA_VISIBLE_DEVICES=0..N-1 and hide the
    # rest of the shape's GPUs. The one worker sees every GPU, and the device pool uses them all.
    # Loopback unless told otherwise (`--host 0.0.0.0`, as the container does): a laptop's server stays private.
    http={"host": "127.0.0.1", "port": 3000},
)
@bentoml.asgi_app(routes, path="/")
class SD3Medium:
    def __init__(self) -> None:
        self.engine = build_engine(SETTINGS)
        log.info("Images go to %s; devices %s; predict on %s, health on %s", self.engine.writer.describe(),
                 SETTINGS.sd3_device, PREDICT_ROUTE, HEALTH_ROUTE)
        self.engine.start()

    @routes.get(HEALTH_ROUTE)
    def health(self) -> JSONResponse:
        health = self.engine.health()
        if health.status == "ready":
            return JSONResponse(health.details)
        return JSONResponse(health.details, status_code=503, headers={"Retry-After": "10"})

    @bentoml.api(route=PREDICT_ROUTE, input_spec=AnyObject, output_spec=PredictResponse)
    async def predict(self, **fields) -> PredictResponse:
        """Generate images (from a prompt, or a starting image), store them, and answer where they are; or,
        with a `request_id` alone, answer an earlier request's images or status."""
        sent = as_sent()
        if isinstance(sent, PollRequest):
            outcome = await self._run(lambda: self.engine.poll(sent.request_id))
        else:
            outcome = await self._run(lambda: self.engine.run(sent))
        if isinstance(outcome, Response):
            return outcome
        if isinstance(outcome, PendingResponse):
            return JSONResponse(outcome.model_dump(mode="json"), status_code=202,
                                headers={"Retry-After": str(outcome.retry_after)})
        return JSONResponse(outcome.response.model_dump(mode="json", exclude_none=False))

    @bentoml.api(route="/txt2img", input_spec=ImageParameters)
    async def txt2img(self, **fields) -> bytes:
        """Generate one image and answer its bytes (for local use; the image is stored too)."""
        sent = as_sent()
        return self._image_bytes(await self._run(lambda: self.engine.run(sent, wait_to_end=True)))

    @bentoml.api(route="/img2img", input_spec=Img2ImgParameters)
    async def img2img(self, **fields) -> bytes:
        """Repaint a starting image (inpaint with a mask) and answer the image's bytes (local use; it is stored too)."""
        sent = as_sent()
        return self._image_bytes(await self._run(lambda: self.engine.run(sent, wait_to_end=True)))

    @staticmethod
    def _image_bytes(outcome):
        if isinstance(outcome, Response):
            return outcome
        file = outcome.files[0]
        return Response(content=file.data, media_type=file.content_type,
                        headers={"X-Request-Id": outcome.response.request_id,
                                 "X-Seed": str(outcome.response.seed)})

    async def _run(self, call):
        try:
            return await call()
        except RequestProblem as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            return error_response(exc.status, exc.code, str(exc), field=exc.field, headers=headers)
        except InputError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            problems = [{"field": exc.field, "message": str(exc)}] if exc.status == 400 else None
            return error_response(exc.status, exc.code, str(exc), field=exc.field, headers=headers, problems=problems)
        except NotReady as exc:
            return error_response(503, "not_ready", str(exc), headers={"Retry-After": "10"})
        except QueueFull as exc:
            return error_response(429, "queue_full", str(exc), headers={"Retry-After": str(exc.retry_after)})
        except Exception:  # a bug: log it whole, answer in the contract's shape without internals
            log.exception("Request failed")
            return error_response(500, "internal_error", "generation failed; the server log has the details")


SD3Medium.add_asgi_middleware(
    ApiDocuments,
    document=lambda: api_document(SD3Medium.openapi_spec.asdict()["paths"], PREDICT_ROUTE, HEALTH_ROUTE),
)
SD3Medium.add_asgi_middleware(
    RequestGuard,
    models={PREDICT_ROUTE: predict_body, "/txt2img": ImageParameters, "/img2img": Img2ImgParameters},
    max_body_bytes=SETTINGS.max_body_bytes,
)
