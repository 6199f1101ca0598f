"""What the operator sees: messages and progress on stderr, results on stdout, errors as one clear message."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import oci
from oci._vendor import requests as sdk_requests
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.text import Text

from provisioner.settings import ConfigError


class OperationFailed(Exception):
    """An OCI operation ended badly (a FAILED deployment or work request); the details were already shown."""


# soft_wrap: OCIDs, URLs and the ready-to-paste command must never be broken across lines.
err = Console(stderr=True, soft_wrap=True, highlight=False)


def info(message: str) -> None:
    """A progress message for the operator (stderr)."""
    err.print(message, markup=False)


def warn(message: str) -> None:
    """A warning (stderr)."""
    err.print(f"warning: {message}", markup=False, style="yellow")


def result(text: str) -> None:
    """A result line on stdout, plain so it can be piped and pasted."""
    print(text, flush=True)


def result_json(value: Any) -> None:
    """A JSON result on stdout."""
    print(json.dumps(value, indent=2, sort_keys=False, default=str), flush=True)


@contextlib.contextmanager
def byte_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar over `total` bytes; yields the callback that advances it by n bytes."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
        progress.update(task, completed=total)


class StatusLine:
    """A live one-line status while waiting; also logs each state change, so logs of a non-TTY run show them."""

    def __init__(self, what: str):
        self.what = what
        self.started = time.monotonic()
        self.last_state: str | None = None
        self._status = err.status(Text(f"{what}: waiting"))

    def __enter__(self) -> StatusLine:
        self._status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._status.__exit__(*exc)

    def update(self, state: str, details: str | None = None) -> None:
        elapsed = int(time.monotonic() - self.started)
        text = f"{self.what}: {state} ({elapsed // 60}m{elapsed % 60:02d}s)"
        if details:
            text += f" - {details}"
        if state != self.last_state:
            err.print(text, markup=False)
            self.last_state = state
        self._status.update(Text(text))


def describe_error(exc: BaseException) -> tuple[str, int] | None:
    """One clear message and an exit code for an error the operator can act on; None for a bug."""
    if isinstance(exc, ConfigError):
        return f"error: {exc}", 2
    if isinstance(exc, OperationFailed):
        return f"failed: {exc}", 1
    if isinstance(exc, oci.exceptions.ServiceError):
        return f"OCI error: {describe_service_error(exc)}", 1
    if isinstance(exc, oci.exceptions.MaximumWaitTimeExceeded):
        return f"timed out: {exc} (the operation goes on in OCI; check it with `status`)", 1
    if isinstance(exc, (oci.exceptions.RequestException, sdk_requests.exceptions.RequestException)):
        return f"network error: {describe_network_error(exc)}", 1
    if isinstance(exc, oci.exceptions.MultipartUploadError):
        causes = [describe_service_error(c) if isinstance(c, oci.exceptions.ServiceError) else str(c)
                  for c in exc.error_causes] or [str(exc)]
        return f"upload failed: {'; '.join(dict.fromkeys(causes))}", 1
    if isinstance(exc, (oci.exceptions.ClientError, FileNotFoundError)):
        return f"error: {exc}", 2
    return None


def describe_service_error(exc: oci.exceptions.ServiceError) -> str:
    """`<status> <code>: <message> (<operation>, opc-request-id <id>)`, including our service's own error body."""
    code, message = exc.code, exc.message
    details = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    body_error = details.get("error")
    if isinstance(body_error, dict):  # the SD3 service answers {"error": {"code", "message", "field"}}
        code = code or body_error.get("code")
        message = body_error.get("message") or message
        if body_error.get("field"):
            message = f"{message} (field {body_error['field']})"
    if not message or (isinstance(message, str) and message.startswith("The service returned error code")):
        message = "no message"
    where = ", ".join(part for part in (exc.operation_name, f"opc-request-id {exc.request_id}") if part)
    return f"{exc.status} {code or '-'}: {message} ({where})"


def describe_network_error(exc: BaseException) -> str:
    """The transport error and the request it hit, without the SDK's boilerplate."""
    cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    parts = [str(part) for part in cause.args] or [str(cause)]
    where = next((part.split(" See ")[0] for part in parts[1:] if part.startswith("Request Endpoint:")), None)
    return f"{parts[0]} ({where})" if where else parts[0]


def exit_with(exc: BaseException) -> None:
    """Print the error as one message and exit, or re-raise a bug with its traceback."""
    described = describe_error(exc)
    if described is None:
        raise exc
    message, code = described
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)
