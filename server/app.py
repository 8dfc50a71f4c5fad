"""The FastAPI application: health, readiness, models and metrics here; the protocols in their own routers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from omnitalk.engine.omni import EngineConfig, OmniEngine
from omnitalk.engine.speech.config import SpeechConfig
from omnitalk.engine.thinker.config import ThinkerStartError
from omnitalk.engine.thinker.engine import ThinkerConfig
from omnitalk.server import errors, logs
from omnitalk.server.auth import Guard
from omnitalk.server.chat.protocol import ChatCompletionRequest
from omnitalk.server.chat.routes import router as chat_router
from omnitalk.server.realtime.routes import router as realtime_router
from omnitalk.server.settings import VLLM_FIELDS, ServerSettings
from omnitalk.server.state import ServerState

log = logging.getLogger("omnitalk")
WATCH_INTERVAL_S = 0.25
STATIC = Path(__file__).parent / "static"  # the voice demo page: plain HTML and JavaScript modules


def engine_config(settings: ServerSettings) -> EngineConfig:
    """The engine `omnitalk serve` runs for these settings (`settings.model` must be set)."""
    thinker = ThinkerConfig(model=settings.model, **{name: getattr(settings, name) for name in VLLM_FIELDS})
    speech = SpeechConfig(
        device=settings.speech_device,
        dtype=settings.speech_dtype,
        max_streams=settings.max_concurrent_streams,
        talker_memory_gib=settings.talker_memory_gib,
        first_chunk_codes=settings.first_chunk_codes,
        ode_solver=settings.ode_solver,
        enforce_eager=settings.enforce_eager,
        code2wav_workers=settings.code2wav_workers,
        threads=settings.speech_threads,
    )
    return EngineConfig(thinker, speech)


def create_app(state: ServerState) -> FastAPI:
    """With `state.engine` set the app serves that engine; otherwise it loads one at start-up, in the background,
    answering /health at once and /ready only once the engine is loaded."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        owned = state.engine is None
        loading = asyncio.create_task(_load(state)) if owned else None
        watchdog = asyncio.create_task(_watch(state))
        yield
        watchdog.cancel()
        if loading is not None:
            loading.cancel()
        if owned and state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="omnitalk", lifespan=lifespan)
    app.state.omnitalk = state
    errors.install(app)
    app.add_middleware(Guard, settings=state.settings)
    app.include_router(chat_router)
    app.include_router(realtime_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def demo() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.openapi = lambda: _openapi(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        cause = state.failure
        if cause is not None:
            return JSONResponse({"status": "unhealthy", "cause": cause}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        cause = state.failure
        if cause is not None:
            return JSONResponse({"status": "unhealthy", "cause": cause}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "omnitalk"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.engine), media_type="text/plain; version=0.0.4")

    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus the chat request body (the route reads its body itself, bounded, so FastAPI cannot
    see it): clients and schemathesis can build real requests from it."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        body["examples"] = [{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}]
        components["ChatCompletionRequest"] = body
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}
        schema["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {"required": True, "content": content}
        app.openapi_schema = schema
    return app.openapi_schema


async def _load(state: ServerState) -> None:
    started = time.monotonic()
    try:
        state.engine = await asyncio.to_thread(OmniEngine.start, engine_config(state.settings))
        logs.ready(state.engine, time.monotonic() - started)
    except ThinkerStartError as error:  # a configuration vLLM accepted but the tap cannot serve: say so, once
        state.fatal = f"the engine cannot start: {error}"
    except Exception as error:
        log.debug("the engine failed to start", exc_info=error)
        state.fatal = f"the engine failed to start: {type(error).__name__}: {error}".splitlines()[0]


async def _watch(state: ServerState) -> None:
    """Once the server cannot serve (a dead stage, a failed start), /health says why, and `on_fatal` runs after
    the grace time, time for the requests that stage held to get their errors out."""
    while state.failure is None:
        await asyncio.sleep(WATCH_INTERVAL_S)
    state.fatal = state.failure  # kept: shutting the dead engine down must not make it look healthy again
    log.error("%s: this server cannot serve any more", state.failure)
    await asyncio.sleep(state.settings.failure_grace_s)
    if state.on_fatal is not None:
        state.on_fatal()
