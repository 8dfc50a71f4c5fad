"""How the speech stage (talker + Code2Wav) is built: one plain config, validated when made."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SpeechConfig:
    device: str = "cpu"
    max_streams: int = 64  # streams the talker and Code2Wav batch at once

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {self.max_streams}")
