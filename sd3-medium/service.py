"""SD3 Medium image generation, served by BentoML: the native API (`POST /predict`, `GET /health`, `POST /txt2img`,
`POST /img2img`) and the OpenAI Images API (`/v1/images/generations`, `/edits`, `/variations`, `/v1/models`).

This file is routing and wiring only: each route hands off to its API surface (`sd3_service/api/`), an
adapter over the one engine (`sd3_service/engine.py`) that `sd3_service/compose.py` builds from the
settings. docs/architecture.md describes the pieces.
"""

from __future__ import annotations

import logging
import sys

import bentoml
from fastapi import FastAPI, Request

from sd3_service.api import native, openai
from sd3_service.api.documents import ApiDocuments, api_document
from sd3_service.api.guard import RequestGuard, validated_body
from sd3_service.compose import ModelLoaders, build_engine
from sd3_service.settings import Settings

SETTINGS = Settings()  # read once at start-up; routes depend on it
log = logging.getLogger("sd3")
if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    if SETTINGS.log_format == "json":  # one object per line, with each request's fields for a log search
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

PREDICT_ROUTE = SETTINGS.model_deploy_predict_endpoint
HEALTH_ROUTE = SETTINGS.model_deploy_health_endpoint
# The plain (non-BentoML) routes: health, and the OpenAI surface. BentoML serves the API page, so FastAPI serves
# none; each route finds the engine in the app's state.
routes = FastAPI(title="sd3-medium", docs_url=None, redoc_url=None, openapi_url=None)
routes.include_router(openai.router)


@routes.get(HEALTH_ROUTE)
def health(request: Request):
    return native.health(request.app.state.engine)


class SD3MediumService:
    """Loads the model on every device once, then serves both API surfaces from one engine."""

    loaders = ModelLoaders()  # how the model is loaded (a benchmark's stand-in service brings its own)

    def __init__(self) -> None:
        self.engine = build_engine(SETTINGS, self.loaders)
        routes.state.engine = self.engine
        routes.state.model_names = SETTINGS.model_names
        routes.state.keepalive_seconds = SETTINGS.stream_keepalive_seconds
        log.info("Images go to %s; devices %s; predict on %s, health on %s", self.engine.writer.describe(),
                 SETTINGS.sd3_device, PREDICT_ROUTE, HEALTH_ROUTE)
        self.engine.start()

    @bentoml.api(route=PREDICT_ROUTE, input_spec=native.PredictInput, output_spec=native.PredictOutput)
    async def predict(self, **fields) -> dict:
        """Generate images (from a prompt, or a starting image), store them, and answer where they are; or,
        with a `request_id` alone, answer an earlier request's images or status."""
        return await native.predict(self.engine, self._sent(), SETTINGS.stream_keepalive_seconds)

    @bentoml.api(route="/txt2img", input_spec=native.Txt2ImgInput)
    async def txt2img(self, **fields) -> bytes:
        """Generate one image and answer its bytes (for local use; the image is stored too)."""
        return await native.image(self.engine, self._sent())

    @bentoml.api(route="/img2img", input_spec=native.Img2ImgInput)
    async def img2img(self, **fields) -> bytes:
        """Repaint a starting image (inpaint with a mask) and answer the image's bytes (local use; it is stored too)."""
        return await native.image(self.engine, self._sent())

    def _sent(self):
        """The body of the request being served, as the guard validated it. (A `ctx` parameter would have BentoML
        overwrite the status of every Response a route returns with the context's, 200.)"""
        return validated_body(self.bento_service.context.request.scope)


def serve(service_class: type, name: str) -> bentoml.Service:
    """`service_class` as a BentoML service: its routes, the plain routes, the API documents and the guard."""
    service = bentoml.service(
        name=name,
        traffic={"timeout": 300},  # our own queue bound answers 429 long before this
        # No `resources={"gpu": N}`: BentoML would then give the worker CUDA_VISIBLE_DEVICES=0..N-1 and hide the
        # rest of the shape's GPUs. The one worker sees every GPU, and the device pool uses them all.
        # Loopback unless told otherwise (`--host 0.0.0.0`, as the container does): a laptop's server stays private.
        http={"host": "127.0.0.1", "port": 3000},
    )(bentoml.asgi_app(routes, path="/")(service_class))
    service.add_asgi_middleware(ApiDocuments, document=lambda: api_document(
        service.openapi_spec.asdict()["paths"],
        [lambda schemas: native.native_paths(schemas, PREDICT_ROUTE, HEALTH_ROUTE),
         lambda schemas: openai.openai_paths(schemas, links=routes.state.engine.writer.makes_links())],
        native.DESCRIPTION))
    service.add_asgi_middleware(RequestGuard, routes={**native.guarded_routes(PREDICT_ROUTE),
                                                      **openai.guarded_routes()},
                                max_body_bytes=SETTINGS.max_body_bytes, unroutable=(openai.unroutable,))
    return service


SD3Medium = serve(SD3MediumService, name="sd3-medium")
