"""The ASGI guard in front of every API surface: the body's size, its syntax and its fields, before BentoML.

For each guarded route the surface says how to read the body (`GuardedRoute.parse`, which raises
`ServiceError`) and how to answer an error in its own format (`GuardedRoute.render`). The guard refuses
an oversized body (413) while it streams in, parses and validates what fits, leaves the result in the
request's scope for the route (`validated_body`), and answers every failure itself: whatever a parser
raises, the request gets an answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from sd3_service.errors import Problem, ServiceError, internal_error, invalid_input

log = logging.getLogger("sd3.guard")

VALIDATED_BODY = "sd3.validated_body"  # where the guard leaves the parsed body in the request's state


@dataclass(frozen=True)
class GuardedRoute:
    """How the guard treats one POST route.

    Args:
        render: the route's surface's error format.
        parse: the body (and its headers) to what the route takes, or `ServiceError`; None passes the body on
            after the size check.
        as_json: tell the app the body is JSON whatever Content-Type the client sent (curl -d sends a form type).
    """

    render: Callable[[ServiceError], Any]
    parse: Callable[[bytes, dict[str, str]], Any] | None = None
    as_json: bool = False


def json_object(body: bytes) -> dict:
    """The body as a JSON object, or `ServiceError` 400 `malformed_json` / `invalid_input` saying why not."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServiceError(400, "malformed_json", f"the body is not valid JSON: {exc}", field="body") from None
    except RecursionError:  # Python's parser gives up on deep nesting (~1,000 levels) this way
        raise ServiceError(400, "malformed_json", "the body is not valid JSON here: it is nested too deeply",
                           field="body") from None
    if not isinstance(payload, dict):
        raise ServiceError(400, "invalid_input", "the body must be a JSON object", field="body")
    return payload


def problems_of(exc: ValidationError) -> list[Problem]:
    """One `Problem` per pydantic error, in words a caller can act on."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "body"
        if error["type"] == "extra_forbidden":
            message = f"unknown field '{field}'"
        elif error["type"] == "missing":
            message = f"'{field}' is required"
        else:  # pydantic prefixes our own validators' messages with "Value error, "
            message = f"{field}: {error['msg'].removeprefix('Value error, ')}"
        problems.append(Problem(field, message))
    return problems


def validated(model: type[BaseModel], payload: dict) -> BaseModel:
    """`payload` as `model`, or `ServiceError` 400 naming every invalid field (and the allowed ones)."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise invalid_input(problems_of(exc), allowed=list(model.model_fields)) from None


class RequestGuard:
    """ASGI middleware: size limit, then parsing and validation, for the POST routes the surfaces name.

    Args:
        routes: path -> how to guard it.
        max_body_bytes: larger bodies get 413 (OCI Model Deployment's own limit is 10 MB).
        unroutable: answers for requests no route can take (each returns a response, or None to pass it on).
    """

    def __init__(self, app, routes: dict[str, GuardedRoute], max_body_bytes: int,
                 unroutable: tuple[Callable[[dict], Any], ...] = ()):
        self.app = app
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.unroutable = unroutable

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for answer in self.unroutable:
                if (response := answer(scope)) is not None:
                    return await response(scope, receive, send)
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self._read(scope, receive)
            if body is None:  # the client went away
                return
            validated_body = route.parse(body, _headers(scope)) if route.parse is not None else None
        except ServiceError as exc:
            return await route.render(exc)(scope, receive, send)
        except Exception:  # noqa: BLE001 - a parser's bug: logged whole, and the request still gets an answer
            log.exception("Reading the body of %s failed", scope.get("path"))
            return await route.render(internal_error())(scope, receive, send)
        # The route reads the request as parsed here: BentoML passes every field, defaults included, but which
        # fields the client sent matters (an input image sets the output size only where none was sent).
        scope.setdefault("state", {})[VALIDATED_BODY] = validated_body

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers = scope["headers"]
        if route.as_json:
            headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]
        await self.app({**scope, "headers": headers}, replay, send)

    async def _read(self, scope, receive) -> bytes | None:
        """The whole body, or `ServiceError` 413 as soon as it is known to be too large."""
        too_large = ServiceError(413, "payload_too_large", f"the request body is larger than {self.max_body_bytes} "
                                                          "bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _headers(scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}


def validated_body(scope: dict) -> Any:
    """What the guard parsed for this request (None when the guard did not see it)."""
    return scope.get("state", {}).get(VALIDATED_BODY)
