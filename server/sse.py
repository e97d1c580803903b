"""Server-sent events exactly as OpenAI streams them: `data: <json>` lines, a blank line each, then `[DONE]`."""

from __future__ import annotations

import json

from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # keep proxies from buffering the stream


def event(chunk: BaseModel) -> bytes:
    """One chunk with only the fields its builder set (OpenAI omits unset fields, e.g. in deltas)."""
    return b"data: " + chunk.model_dump_json(exclude_unset=True).encode() + b"\n\n"


def error_event(error: APIError) -> bytes:
    """An error after the 200 was sent; the official clients raise APIError on an event with an `error` key."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A streaming response that always runs `on_close`, even when the client left before the body started
    (then Starlette never starts the body iterator, so its own cleanup would not run)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]):
        super().__init__(events, media_type=MEDIA_TYPE, headers=HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
