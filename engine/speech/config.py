"""How the speech stage (talker + Code2Wav) is built: one plain config, validated when made."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SpeechConfig:
    device: str = "cpu"
    max_streams: int = 64  # streams the talker and Code2Wav batch at once
    talker_memory_gib: float | None = None  # the talker's KV pool; None: 15% of a GPU's memory, 1 GiB on CPU
    enforce_eager: bool = False  # no CUDA graphs for the talker's decode step

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {self.max_streams}")
        if self.talker_memory_gib is not None and self.talker_memory_gib <= 0:
            raise ValueError(f"talker_memory_gib must be positive, got {self.talker_memory_gib}")
