"""POST /v1/chat/completions: read a bounded body, hand it to the serving layer, send JSON or server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from omnitalk.server.chat.protocol import parse_request
from omnitalk.server.chat.serving import ChatServing
from omnitalk.server.chat.sse import EventStream, Stream
from omnitalk.server.errors import APIError
from omnitalk.server.state import ServerState

router = APIRouter()
T = TypeVar("T")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.omnitalk
    body = await read_body(request, state.settings.max_message_bytes)
    result = await until_disconnect(request, serving(request).create(parse_request(body)))
    if result is None:
        return Response(status_code=499)  # nobody is listening
    return EventStream(result) if isinstance(result, Stream) else JSONResponse(result)


def serving(request: Request) -> ChatServing:
    """The app's one ChatServing (it keeps the recent answers' transcripts)."""
    app_state = request.app.state
    if getattr(app_state, "chat", None) is None:
        app_state.chat = ChatServing(app_state.omnitalk)
    return app_state.chat


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be larger than `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    return bytes(body)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        f"the request body ({size} bytes or more) exceeds this server's limit of {limit} bytes",
        413,
        code="request_too_large",
    )


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None once the client has gone: then `work` is cancelled, which frees the engine."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
