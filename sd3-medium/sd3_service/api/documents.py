"""The service's OpenAPI document, put together from every API surface's paths, and the API page.

BentoML's own document declares its generic error bodies and `text/plain` for bytes; this one declares
what the service really answers: every status a route can give, with its body and headers, and the
image media types. Each surface describes its own routes (`native/document.py`, `openai/document.py`);
BentoML's infrastructure routes (`/livez`, `/readyz`, `/metrics`) are kept as it describes them. The API
page is BentoML's Swagger page without anything loaded from outside the deployment.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse

from sd3_service import __version__
from sd3_service.spec import WireModel

OPENAPI_VERSION = "3.0.2"
DOCUMENT_ROUTES = ("/docs.json", "/openapi.json")
REF = "#/components/schemas/{model}"
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                               "schema": {"type": "integer", "minimum": 1}}}


def openapi_30(schema: Any) -> Any:
    """Rewrite pydantic's JSON Schema into OpenAPI 3.0's dialect: `anyOf [X, null]` becomes X, nullable."""
    if isinstance(schema, list):
        return [openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: openapi_30(value) for key, value in schema.items()}
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


def _null_is_default(schema: dict) -> dict:
    """An object schema whose optional properties also take null."""
    required = set(schema.get("required", ()))
    for name, field in schema.get("properties", {}).items():
        if name in required or field.get("nullable"):
            continue
        if "$ref" in field:  # a reference cannot carry siblings in 3.0: wrap it
            schema["properties"][name] = field = {"allOf": [{"$ref": field.pop("$ref")}], **field}
        field["nullable"] = True
        if "enum" in field:
            field["enum"] = [*field["enum"], None]  # 3.0 validators check an enum before `nullable`
    return schema


class Schemas:
    """The document's `components.schemas`, filled by the surfaces as they describe their routes."""

    def __init__(self):
        self.components: dict[str, Any] = {}

    def ref(self, model: type[BaseModel], mode: str = "serialization") -> dict[str, str]:
        """Add `model` (and the models it uses) to the components; a reference to it. A request body's optional
        fields are nullable: null means the default (`WireModel`)."""
        schema = model.model_json_schema(ref_template=REF, mode=mode)
        request = issubclass(model, WireModel) and mode == "validation"
        for name, nested in schema.pop("$defs", {}).items():
            self.components[name] = _null_is_default(openapi_30(nested)) if request else openapi_30(nested)
        self.components[model.__name__] = _null_is_default(openapi_30(schema)) if request else openapi_30(schema)
        return {"$ref": REF.format(model=model.__name__)}

    def add(self, name: str, schema: dict) -> dict[str, str]:
        """Add a schema written by hand (one no model describes); a reference to it."""
        self.components[name] = schema
        return {"$ref": REF.format(model=name)}


def event_stream(description: str) -> dict[str, Any]:
    """A `text/event-stream` answer's entry: each event an object of its name and its data (`description` says
    which events come)."""
    return {"schema": {"type": "object", "description": description,
                       "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}}


def json_body(reference: dict[str, str]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": reference}}}


def api_document(bentoml_paths: dict[str, Any], surfaces: list[Callable[[Schemas], dict[str, Any]]],
                 description: str) -> dict[str, Any]:
    """The whole OpenAPI document: each surface's paths, and BentoML's own infrastructure routes."""
    schemas = Schemas()
    paths: dict[str, Any] = {
        path: copy.deepcopy(item) for path, item in bentoml_paths.items()
        if "Infrastructure" in next(iter(item.values()), {}).get("tags", [])
    }
    for describe in surfaces:
        paths.update(describe(schemas))
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "SD3 Medium image generation", "version": __version__, "description": description},
        "servers": [{"url": "."}],
        "paths": paths,
        "components": {"schemas": schemas.components},
    }


def api_page() -> str:
    """BentoML's Swagger page, without Google Tag Manager and without Swagger's online validator badge: a
    deployment behind a private endpoint loads nothing from outside it."""
    import _bentoml_impl.server

    page = (Path(_bentoml_impl.server.__file__).parent / "main-openapi.html").read_text()
    page = re.sub(r"\s*<!-- Google Tag Manager( \(noscript\))? -->.*?<!-- End Google Tag Manager( \(noscript\))? -->",
                  "", page, flags=re.S)
    # The stock initializer leaves `validatorUrl` at its default, which loads a badge from validator.swagger.io.
    initializer = ('<script>window.onload = () => { window.ui = SwaggerUIBundle({url: "./docs.json", '
                   'dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null, '
                   'presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], '
                   'plugins: [SwaggerUIBundle.plugins.DownloadUrl], layout: "StandaloneLayout"}); };</script>')
    return re.sub(r'<script src="\./static_content/swagger-initializer\.js"[^>]*>\s*</script>', initializer, page)


class ApiDocuments:
    """ASGI middleware: the OpenAPI document at `/docs.json` and `/openapi.json`, the API page at `/` (`/docs`
    leads there).

    Args:
        document: makes the document (called once, on the first request for it).
    """

    def __init__(self, app, document: Callable[[], dict[str, Any]]):
        self.app = app
        self._make_document = document
        self._document: dict[str, Any] | None = None
        self._page: str | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in DOCUMENT_ROUTES:
            if self._document is None:
                self._document = self._make_document()
            return await JSONResponse(self._document)(scope, receive, send)
        if path == "/":
            if self._page is None:
                self._page = api_page()
            return await HTMLResponse(self._page)(scope, receive, send)
        if path == "/docs":  # where FastAPI and older BentoML put the page; BentoML 1.4 serves it at /
            return await RedirectResponse("/", status_code=307)(scope, receive, send)
        return await self.app(scope, receive, send)
