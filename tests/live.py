"""A second real server on the session's engine, with its own settings (keys, limits): for tests that need them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn

from omnitalk.engine.omni import OmniEngine
from omnitalk.server.app import create_app
from omnitalk.server.settings import ServerSettings
from omnitalk.server.state import ServerState

MODEL = "omnitalk-tiny-random"


@asynccontextmanager
async def live_server(engine: OmniEngine, settings: ServerSettings) -> AsyncIterator[tuple[str, ServerState]]:
    """(base URL, state) of the app under uvicorn on loopback, serving `engine` with `settings`."""
    state = ServerState(settings, MODEL, engine=engine)
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning",
                            ws_max_size=settings.ws_max_size, ws_per_message_deflate=False)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        await task


async def settled(state: ServerState) -> bool:
    """Every stage of the served engine is idle again (polled: a stream ends a little after its client)."""
    engine = state.engine
    for _ in range(400):
        idle = (
            state.limiter.active == 0
            and state.metrics.live_streams._value.get() == 0
            and engine.thinker.num_open_streams == 0
            and not engine.thinker.llm.output_processor.has_unfinished_requests()
            and engine.speech.num_streams == 0
            and engine.speech.talker.num_free_slots == engine.speech.max_batch
        )
        if idle:
            return True
        await asyncio.sleep(0.05)
    return False
