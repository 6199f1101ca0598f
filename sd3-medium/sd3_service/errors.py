"""The one error type of the service: what went wrong for a request, as every API surface answers it.

The engine and everything below it raise `ServiceError` (or let a bug escape as any other exception,
which `ServiceError.of` turns into a 500 without internals). Each API surface maps it to its own wire
format in one place (`api/native/surface.py`, `api/openai/surface.py`); the request ledger keeps it
(`to_record`) so that a poll answers a failed request's own error.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

# Every code an error answer may carry, on either API surface (a pending request's OpenAI 409, `request_in_progress`,
# is an answer to come, not an error): the metrics count each from zero, and the documents list them.
ERROR_CODES = ("invalid_input", "malformed_json", "malformed_form", "payload_too_large", "queue_full", "not_ready",
               "input_not_found", "input_unavailable", "lora_not_found", "lora_unavailable", "model_not_found",
               "unknown_request", "request_id_reused", "request_interrupted", "ledger_unavailable",
               "store_unavailable", "image_gone", "not_found", "method_not_allowed", "internal_error")


@dataclass
class Problem:
    """One invalid field of a request."""

    field: str  # dotted for nested fields (`loras.0.name`); `body` for the body as a whole
    message: str


@dataclass(eq=False)  # an exception compares and hashes by identity
class ServiceError(Exception):
    """A request answered with an error: HTTP status, a stable code, words a caller can act on, the field at fault.

    Args:
        retry_after: seconds after which the same request may succeed (429, 503), also the `Retry-After` header.
        problems: every invalid field, for `invalid_input` (the first one is `field`).
    """

    status: int
    code: str
    message: str
    field: str | None = None
    retry_after: int | None = None
    problems: list[Problem] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, exc: BaseException) -> ServiceError:
        """`exc` as the error a caller gets: itself, or for anything else (a bug) a 500 that names no internals."""
        if isinstance(exc, ServiceError):
            return exc
        return internal_error()

    def to_record(self) -> dict:
        """What a request's record keeps of it (no `problems`: the message names them all)."""
        kept = {"status": self.status, "code": self.code, "message": self.message, "field": self.field}
        return kept if self.retry_after is None else {**kept, "retry_after": self.retry_after}

    @classmethod
    def from_record(cls, recorded: dict) -> ServiceError:
        return cls(recorded["status"], recorded["code"], recorded["message"], recorded.get("field"),
                   recorded.get("retry_after"))


def invalid_input(problems: list[Problem], allowed: list[str] | None = None) -> ServiceError:
    """400 naming every invalid field; `allowed`: the fields a body may have, said when one is unknown."""
    message = "; ".join(problem.message for problem in problems)
    if allowed is not None and any(problem.message.startswith("unknown field") for problem in problems):
        message += f" (allowed fields: {', '.join(allowed)})"
    return ServiceError(400, "invalid_input", message, field=problems[0].field, problems=problems)


def invalid_field(field: str, message: str) -> ServiceError:
    """400 for one field: `message` says what is wrong and what is allowed."""
    return invalid_input([Problem(field, f"{field}: {message}")])


def not_ready(reason: str) -> ServiceError:
    return ServiceError(503, "not_ready", reason, retry_after=10)


def queue_full(retry_after: int) -> ServiceError:
    return ServiceError(429, "queue_full", f"the generation queue is full; retry in {retry_after} s",
                        retry_after=retry_after)


def internal_error() -> ServiceError:
    return ServiceError(500, "internal_error", "generation failed; the server log has the details")


def caller_error(exc: BaseException, log: logging.Logger) -> ServiceError:
    """`exc` as the caller gets it; a bug (anything but a `ServiceError`) is logged whole first."""
    if not isinstance(exc, ServiceError):
        log.error("Request failed", exc_info=exc)
    return ServiceError.of(exc)
