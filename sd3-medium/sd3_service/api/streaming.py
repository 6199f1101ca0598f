"""Server-Sent Events: how both surfaces write a streamed answer (`text/event-stream`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

KEEP_ALIVE = b": keep-alive\n\n"  # a comment: clients and proxies see traffic, parsers see no event


def event(name: str | None, data: str) -> bytes:
    """One event: its name (None: a plain `message`) and its data, one line of JSON."""
    return (f"event: {name}\n" if name else "").encode() + f"data: {data}\n\n".encode()


def event_stream(chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    """A streamed answer, each chunk sent as soon as it is written (no proxy buffering, no caching)."""
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
