"""How the speech stage (talker + Code2Wav) is built: one plain config, validated when made."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

FIRST_CHUNK_CODES = (48, 24, 12)  # what the DiT's blocks and look-ahead allow (docs/code2wav.md)
ODE_SOLVERS = ("rk4", "euler")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class SpeechConfig:
    device: str = "auto"  # "auto": the thinker's GPU (cuda:0, the first visible one) on CUDA, else "cpu"
    dtype: str = "auto"  # the talker's and Code2Wav's; "auto": bfloat16 on CUDA, float32 on the CPU; or one of DTYPES
    max_streams: int = 64  # streams the talker and Code2Wav batch at once
    talker_memory_gib: float | None = None  # the talker's KV pool; None: 15% of a GPU's memory, 1 GiB on CPU
    first_chunk_codes: int = 48  # codes before a stream's first audio: 48 (Qwen's), 24 or 12
    ode_solver: str = "rk4"  # Code2Wav's flow ODE: "rk4" (transformers', parity) or "euler" (4x fewer DiT calls)
    enforce_eager: bool = False  # no CUDA graphs (talker decode step, Code2Wav windows)
    # CPU only: processes that decode a share of each Code2Wav batch's rows; None: 1 on a multi-core CPU, else 0
    code2wav_workers: int | None = None
    # torch's intra-op threads in this process (the speech thread, input features); None: 1 on a machine without
    # CUDA, where vLLM's CPU worker binds every core but the one it leaves this process, else torch's default
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {self.max_streams}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"speech dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.first_chunk_codes not in FIRST_CHUNK_CODES:
            raise ValueError(f"first_chunk_codes must be one of {FIRST_CHUNK_CODES}, not {self.first_chunk_codes}")
        if self.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"ode_solver must be one of {', '.join(ODE_SOLVERS)}, not {self.ode_solver!r}")
        if self.code2wav_workers is not None and self.code2wav_workers < 0:
            raise ValueError(f"code2wav_workers must not be negative, got {self.code2wav_workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"speech threads must be at least 1, got {self.threads}")
        if self.talker_memory_gib is not None and self.talker_memory_gib <= 0:
            raise ValueError(f"talker_memory_gib must be positive, got {self.talker_memory_gib}")

    def torch_device(self) -> torch.device:
        """The device to load on; ValueError (one line) when it does not exist on this machine."""
        if self.device == "auto":
            return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"speech device {self.device!r} is not a device name ({error})") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"speech device {self.device!r} needs CUDA, and this machine has none")
            if (device.index or 0) >= torch.cuda.device_count():
                raise ValueError(f"speech device {self.device!r}: only {torch.cuda.device_count()} GPU(s) visible")
        elif device.type != "cpu":
            raise ValueError(f"speech device {self.device!r}: the speech stage runs on cpu or cuda[:N]")
        return device

    def num_code2wav_workers(self) -> int:
        """The Code2Wav worker processes to start: ValueError for workers asked on a GPU."""
        on_cpu = self.torch_device().type == "cpu"
        if self.code2wav_workers is None:
            return int(on_cpu and (os.cpu_count() or 1) > 1)
        if self.code2wav_workers and not on_cpu:
            raise ValueError(f"code2wav_workers are for a speech stage on the CPU, not on {self.torch_device()}")
        return self.code2wav_workers

    def num_threads(self) -> int | None:
        """torch's intra-op threads for this process; None: leave torch's default. More threads than the cores
        vLLM's CPU worker leaves free spin against that worker, slowing both it and the speech stage."""
        if self.threads is None and not torch.cuda.is_available():
            return 1
        return self.threads

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]
