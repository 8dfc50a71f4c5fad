"""How the thinker is served: its config, the dtype it runs in, and the vLLM model runner the tap needs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# vLLM's switch between its V1 model runner and Model Runner V2; read in every vLLM process.
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True, slots=True)
class ThinkerConfig:
    """The vLLM engine arguments omnitalk exposes, under vLLM's names; None means vLLM's default."""

    model: Path
    dtype: str = "auto"  # "auto": the checkpoint's own (torch_dtype in its config, else its weights')
    max_model_len: int | None = None  # None: the checkpoint's
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # chunked-prefill token budget per step
    gpu_memory_utilization: float | None = None  # None: 0.25 on CPU (a share of RAM there), 0.6 on GPU
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    enable_prefix_caching: bool = True  # spoken requests are salted alone, or per session (conversation.py)
    distributed_executor_backend: str | None = None
    seed: int = 0


class ThinkerStartError(RuntimeError):
    """The thinker cannot start as configured; the message is one line saying why and what to change."""


def checkpoint_dtype(model: Path) -> str:
    """The dtype a checkpoint was saved in: `torch_dtype` (or `dtype`) in its config.json, top level or the
    thinker's, else the dtype of its first safetensors tensor. vLLM's own "auto" would serve an fp32
    checkpoint in bf16, which is not what transformers computes."""
    config = json.loads((model / "config.json").read_text())
    for section in (config, config.get("thinker_config", {}), config.get("thinker_config", {}).get("text_config", {})):
        for key in ("torch_dtype", "dtype"):
            if isinstance(section.get(key), str):
                return _canonical(section[key])
    from safetensors import safe_open

    files = sorted(model.glob("*.safetensors"))
    if not files:
        return "float32"  # what transformers loads a checkpoint in when nothing says otherwise
    with safe_open(files[0], "pt") as weights:
        name = next(iter(weights.keys()))
        return _SAFETENSORS_DTYPES.get(weights.get_slice(name).get_dtype(), "float32")


def _canonical(name: str) -> str:
    name = name.removeprefix("torch.")
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)


def served_dtype(config: ThinkerConfig) -> str:
    return checkpoint_dtype(config.model) if config.dtype == "auto" else config.dtype


def pin_v1_runner() -> None:
    """The tap reads the V1 model runner's state (the CPU runner is a V1 runner, so this is the tested path);
    vLLM would pick Model Runner V2 on CUDA whenever Triton is installed. Engine processes inherit the pin."""
    value = os.environ.get(RUNNER_ENV)
    if value is None:
        os.environ[RUNNER_ENV] = "0"
    elif value.strip().lower() not in ("0", "false"):
        raise ThinkerStartError(f"{RUNNER_ENV}={value}: omnitalk's hidden-state tap needs vLLM's V1 runner; unset it")


def check_vllm_config(vllm_config: Any) -> None:
    """Refuses a configuration vLLM would run on Model Runner V2 (e.g. features that force it)."""
    if vllm_config.use_v2_model_runner:
        raise ThinkerStartError(
            "vLLM chose Model Runner V2 for this configuration; omnitalk's hidden-state tap supports the V1 runner only"
        )


def check_runner(runner: object) -> None:
    """Run in the worker once its model runner exists: the tap's reads are only valid on a V1 runner."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        raise ThinkerStartError(
            f"vLLM model runner {type(runner).__module__}.{type(runner).__qualname__} is not one the hidden-state "
            f"tap supports (V1 runners only; {RUNNER_ENV}=0)"
        )
