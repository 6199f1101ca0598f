"""SD3 Medium text-to-image, served by BentoML: `POST /predict`, `GET /health`, `POST /txt2img`.

This file is routing only; the work happens in `engine.py` (queue, GPU thread, idempotency),
`generation.py` (pipeline call, encoding), `model_loading.py` and the stores.
"""

from __future__ import annotations

import logging
import sys

import bentoml
from fastapi import FastAPI
from starlette.responses import JSONResponse, Response

from sd3_service.engine import Engine, NotReady, QueueFull
from sd3_service.http_errors import RequestGuard, error_response
from sd3_service.model_loading import load_pipeline
from sd3_service.openapi import ApiDocuments, api_document
from sd3_service.contract import ImageParameters, PredictRequest, PredictResponse
from sd3_service.settings import Settings
from sd3_service.spool import Spool, SpoolingStore
from sd3_service.store import build_store

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


@bentoml.service(
    name="sd3-medium",
    traffic={"timeout": 300},  # our own queue bound answers 429 long before this
    resources={"gpu": 1},
    # Loopback unless told otherwise (`--host 0.0.0.0`, as the container does): a laptop's server stays private.
    http={"host": "127.0.0.1", "port": 3000},
)
@bentoml.asgi_app(routes, path="/")
class SD3Medium:
    def __init__(self) -> None:
        # Images the store cannot take wait in the spool and are uploaded later, under the same names.
        store = SpoolingStore(build_store(SETTINGS), Spool(SETTINGS.spool_dir))
        self.engine = Engine(
            load=lambda: load_pipeline(SETTINGS),
            store=store,
            object_prefix=SETTINGS.object_prefix,
            max_queue=SETTINGS.max_queue,
            cache_size=SETTINGS.idempotency_cache_size,
            on_store_failure=store.keep,
            stored_later=store.stored_later,
            store_params=SETTINGS.store_params,
        )
        log.info("Images go to %s; predict on %s, health on %s", self.engine.store.describe(), PREDICT_ROUTE,
                 HEALTH_ROUTE)
        store.start()
        self.engine.start()

    @routes.get(HEALTH_ROUTE)
    def health(self) -> JSONResponse:
        status, body = self.engine.health()
        headers = {"Retry-After": "10"} if status == 503 else None
        return JSONResponse(body, status_code=status, headers=headers)

    @bentoml.api(route=PREDICT_ROUTE, input_spec=PredictRequest, output_spec=PredictResponse)
    async def predict(self, **fields) -> PredictResponse:
        """Generate images from a prompt, store them, and answer where they are."""
        outcome = await self._run(PredictRequest(**fields))
        if isinstance(outcome, Response):
            return outcome
        return JSONResponse(outcome.response.model_dump(mode="json", exclude_none=False))

    @bentoml.api(route="/txt2img", input_spec=ImageParameters)
    async def txt2img(self, **fields) -> bytes:
        """Generate one image and answer its bytes (for local use; the image is stored too)."""
        outcome = await self._run(PredictRequest(**fields))
        if isinstance(outcome, Response):
            return outcome
        file = outcome.files[0]
        return Response(content=file.data, media_type=file.content_type,
                        headers={"X-Request-Id": outcome.response.request_id,
                                 "X-Seed": str(outcome.response.seed)})

    async def _run(self, request: PredictRequest):
        try:
            return await self.engine.run(request)
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
    models={PREDICT_ROUTE: PredictRequest, "/txt2img": ImageParameters},
    max_body_bytes=SETTINGS.max_body_bytes,
)
