"""Object names: made here and only here, by the server; nothing a client sends but a validated request id."""

from __future__ import annotations

import datetime as dt


def image_name(prefix: str, request_id: str, index: int, extension: str, when: dt.datetime) -> str:
    """`<prefix><yyyy>/<mm>/<dd>/<request_id>-<index>.<ext>`."""
    return f"{prefix}{when:%Y/%m/%d}/{request_id}-{index}.{extension}"


def sidecar_name(prefix: str, request_id: str, when: dt.datetime) -> str:
    """`<prefix><yyyy>/<mm>/<dd>/<request_id>.json`: the parameters that reproduce a request's images."""
    return f"{prefix}{when:%Y/%m/%d}/{request_id}.json"
