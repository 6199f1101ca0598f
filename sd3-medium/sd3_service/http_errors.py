"""Errors in the contract's shape, and the ASGI guard that gives them before BentoML parses a body.

`{"error": {"code": ..., "message": ..., "field": ..., "problems": [...]}}` for every 4xx/5xx we
answer. The guard refuses oversized bodies (413), malformed JSON (400) and invalid fields (400,
every problem named) on the JSON routes, so a bad request never reaches the model.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

VALIDATED_BODY = "sd3.validated_body"  # where RequestGuard leaves the validated body in the request's state


def error_response(status: int, code: str, message: str, field: str | None = None,
                   problems: list[dict] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message, "field": field}
    if problems is not None:
        error["problems"] = problems
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _field_name(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "body"


def describe_validation_error(exc: ValidationError) -> list[dict]:
    """One `{field, message}` per problem, in words a caller can act on."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = _field_name(error["loc"])
        if error["type"] == "extra_forbidden":
            message = f"unknown field '{field}'"
        elif error["type"] == "missing":
            message = f"'{field}' is required"
        else:  # pydantic prefixes our own validators' messages with "Value error, "
            message = f"{field}: {error['msg'].removeprefix('Value error, ')}"
        problems.append({"field": field, "message": message})
    return problems


def invalid_input(problems: list[dict], allowed: list[str] | None = None) -> JSONResponse:
    message = "; ".join(p["message"] for p in problems)
    if allowed is not None and any(p["message"].startswith("unknown field") for p in problems):
        message += f" (allowed fields: {', '.join(allowed)})"
    return error_response(400, "invalid_input", message, field=problems[0]["field"], problems=problems)


class RequestGuard:
    """ASGI middleware: size limit, JSON syntax and schema validation for the JSON POST routes.

    Args:
        models: route path -> the pydantic model its body must satisfy, or a function of the body that says which.
        max_body_bytes: larger bodies get 413 (OCI Model Deployment's own limit is 10 MB).
    """

    def __init__(self, app, models: dict[str, type[BaseModel]], max_body_bytes: int):
        self.app = app
        self.models = models
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        model = self.models.get(scope.get("path", "")) if scope["type"] == "http" else None
        if model is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)

        too_large = error_response(
            413, "payload_too_large", f"the request body is larger than {self.max_body_bytes} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large(scope, receive, send)

        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)

        validated = self._check(body, model)
        if isinstance(validated, JSONResponse):
            return await validated(scope, receive, send)
        # The route reads the request as validated here: which fields the client sent matters (an image's
        # size is the default size only when no size was sent), and BentoML passes every field.
        scope.setdefault("state", {})[VALIDATED_BODY] = validated

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        # The body is valid JSON whatever Content-Type the client sent (curl -d sends a form type):
        # say so, or BentoML would parse it by the declared type and fail.
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        headers.append((b"content-type", b"application/json"))
        await self.app({**scope, "headers": headers}, replay, send)

    @staticmethod
    def _check(body: bytes, model) -> JSONResponse | BaseModel:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return error_response(400, "malformed_json", f"the body is not valid JSON: {exc}", field="body")
        if not isinstance(payload, dict):
            return error_response(400, "invalid_input", "the body must be a JSON object", field="body")
        if not isinstance(model, type):  # chosen by the body (a poll or a request)
            model = model(payload)
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            return invalid_input(describe_validation_error(exc), allowed=list(model.model_fields))


def validated_body(scope: dict) -> BaseModel | None:
    """The body `RequestGuard` validated for this request (None when the guard did not see it)."""
    return scope.get("state", {}).get(VALIDATED_BODY)
