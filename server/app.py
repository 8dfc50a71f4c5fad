"""The FastAPI application: health, readiness, models and metrics here; the protocols in their own routers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from omnitalk.engine.omni import EngineConfig, OmniEngine
from omnitalk.engine.speech.config import SpeechConfig
from omnitalk.engine.thinker.engine import ThinkerConfig
from omnitalk.server import errors, logs
from omnitalk.server.chat.routes import router as chat_router
from omnitalk.server.realtime.routes import router as realtime_router
from omnitalk.server.state import ServerState

log = logging.getLogger("omnitalk")
STATIC = Path(__file__).parent / "static"  # the voice demo page: plain HTML and JavaScript modules


def engine_config(state: ServerState) -> EngineConfig:
    s = state.settings
    thinker = ThinkerConfig(model=s.model, max_model_len=s.max_model_len, max_num_seqs=s.max_num_seqs)
    return EngineConfig(thinker, SpeechConfig(device=s.speech_device, max_streams=s.max_concurrent_streams))


def create_app(state: ServerState) -> FastAPI:
    """With `state.engine` set the app serves that engine; otherwise it loads one at start-up, in the background,
    answering /health at once and /ready only once the engine is loaded."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        owned = state.engine is None
        loading = asyncio.create_task(_load(state)) if owned else None
        yield
        if loading is not None:
            loading.cancel()
        if owned and state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="omnitalk", lifespan=lifespan)
    app.state.omnitalk = state
    errors.install(app)
    app.include_router(chat_router)
    app.include_router(realtime_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def demo() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "omnitalk"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _load(state: ServerState) -> None:
    started = time.monotonic()
    try:
        state.engine = await asyncio.to_thread(OmniEngine.start, engine_config(state))
        logs.ready(state.engine, time.monotonic() - started)
    except Exception:
        log.exception("the engine failed to start")
        raise
