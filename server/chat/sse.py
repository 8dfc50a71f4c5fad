"""Server-sent events, the one place that frames them: `data: {json}`, an OpenAI error frame on failure, `[DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from omnitalk.server.errors import error_body, to_api_error


@dataclass(frozen=True, slots=True)
class Stream:
    """Chunks to send, and what frees the work behind them: called once the response ends, however it ends
    (also when the client left before the first byte, when the chunks never even started)."""

    chunks: AsyncGenerator[dict[str, Any], None]
    close: Callable[[], Awaitable[None]]


def frame(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def frames(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Every chunk as an SSE frame; a failure becomes one error frame in OpenAI's shape; `[DONE]` always ends it."""
    try:
        async for chunk in chunks:
            yield frame(chunk)
    except Exception as error:
        api = to_api_error(error)
        yield frame(error_body(api.message, api.type, api.param, api.code))
    yield frame("[DONE]")


class EventStream(StreamingResponse):
    """text/event-stream of a Stream; a client that disconnects cancels the work behind it at once."""

    media_type = "text/event-stream"

    def __init__(self, stream: Stream) -> None:
        super().__init__(frames(stream.chunks), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.stream.chunks.aclose()
                await self.stream.close()
