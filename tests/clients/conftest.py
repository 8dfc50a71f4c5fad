"""A fake omni server for the bench's own tests: OpenAI-shaped chat SSE and Realtime GA events, no model behind it."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import pytest_asyncio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

CHUNK = b"\x00\x01" * 2400  # 0.1 s of pcm16 at 24 kHz
WORDS = ("Hello", " there", " friend")
STEP_S = 0.02  # between the fake's events


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": "audio.voice", "code": None}}


async def models(_: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "fake-omni", "object": "model"}]})


async def chat(request: Request) -> JSONResponse | StreamingResponse:
    body = await request.json()
    if body["audio"]["voice"] == "nope":
        return JSONResponse(_error("unsupported voice 'nope'"), 400)

    async def events() -> AsyncIterator[str]:
        head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}

        def chunk(delta: dict, finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return "data: " + json.dumps({**head, "choices": [choice], "usage": None}) + "\n\n"

        yield chunk({"role": "assistant", "content": None})
        for word in WORDS:
            await asyncio.sleep(STEP_S)
            yield chunk({"audio": {"id": "audio_1", "transcript": word}})
            await asyncio.sleep(STEP_S)
            yield chunk({"audio": {"id": "audio_1", "data": base64.b64encode(CHUNK).decode()}})
        yield chunk({}, "stop")
        yield chunk({"audio": {"expires_at": 1}})
        usage = {"prompt_tokens": 10, "completion_tokens": 3 + 15, "total_tokens": 28,
                 "completion_tokens_details": {"text_tokens": 3, "audio_tokens": 15}}  # fmt: skip
        yield "data: " + json.dumps({**head, "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def realtime(ws: WebSocket) -> None:
    await ws.accept()
    n = 0

    async def send(kind: str, **fields: object) -> None:
        nonlocal n
        n += 1
        await ws.send_text(json.dumps({"type": kind, "event_id": f"event_{n}", **fields}))

    await send("session.created", session={})
    appended = 0
    while True:
        event = json.loads(await ws.receive_text())
        kind = event["type"]
        if kind == "session.update":
            if event["session"]["audio"]["output"]["voice"] == "nope":
                await send("error", error=_error("unsupported voice 'nope'")["error"])
                continue
            await send("session.updated", session=event["session"])
        elif kind == "input_audio_buffer.append":
            appended += len(base64.b64decode(event["audio"]))
        elif kind == "input_audio_buffer.commit":
            await send("input_audio_buffer.committed", item_id="item_1")
        elif kind == "response.create":
            ids = {"response_id": "resp_1", "item_id": "item_2", "output_index": 0, "content_index": 0}
            await send("response.created", response={"id": "resp_1"})
            for word in WORDS:
                await asyncio.sleep(STEP_S)
                await send("response.output_audio_transcript.delta", delta=word, **ids)
                await asyncio.sleep(STEP_S)
                await send("response.output_audio.delta", delta=base64.b64encode(CHUNK).decode(), **ids)
            usage = {"input_tokens": 10 + appended // 4800, "output_tokens": 18,
                     "output_token_details": {"text_tokens": 3, "audio_tokens": 15}}  # fmt: skip
            await send("response.done", response={"id": "resp_1", "status": "completed", "usage": usage})
            await ws.close()
            return


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fake_server() -> AsyncIterator[str]:
    """The fake under uvicorn on loopback: its base URL."""
    app = Starlette(routes=[
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        WebSocketRoute("/v1/realtime", realtime),
    ])  # fmt: skip
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    uv.should_exit = True
    await task
