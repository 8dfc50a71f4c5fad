"""How the speech stage (talker + Code2Wav) is built: one plain config, validated when made."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SpeechConfig:
    device: str = "cpu"
    max_streams: int = 64  # streams the talker and Code2Wav batch at once
    first_chunk_codes: int = 48  # codes before a stream's first audio: 48 (Qwen's), 24 or 12
    ode_solver: str = "rk4"  # Code2Wav's flow ODE: "rk4" (transformers', parity) or "euler" (4x fewer DiT calls)
    enforce_eager: bool = False  # no CUDA graphs

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {self.max_streams}")
