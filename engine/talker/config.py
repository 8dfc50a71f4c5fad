"""The talker's shape and special token ids, read from the checkpoint's config.json (`talker_config`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class TalkerConfig:
    embedding_size: int  # the thinker's hidden size: rows, text and codec embeddings live here before the proj
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # codec vocabulary
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768  # the longest sequence (prompt + 2 + codes) it was built for
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    codec_pad_id: int = 8292
    codec_bos_id: int = 8293
    codec_eos_id: int = 8294
    codec_mask_id: int = 8296
    text_eos_id: int = 151861
    text_pad_id: int = 151859
    audio_id: int = 151646
    image_id: int = 151655
    video_id: int = 151656

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} heads do not group into {self.num_kv_heads} kv heads")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} does not cover head_dim {self.head_dim}")

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> TalkerConfig:
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text())["talker_config"])

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> TalkerConfig:
        if c.get("hidden_act", "silu") != "silu" or c.get("use_sliding_window"):
            raise ValueError("only SiLU MLPs and full attention are supported")
        # transformers 5 writes rope_parameters; older checkpoints (the released one) rope_theta + rope_scaling.
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        optional = {
            "rms_norm_eps": c.get("rms_norm_eps"),
            "max_position_embeddings": c.get("max_position_embeddings"),
            "rope_theta": rope.get("rope_theta", c.get("rope_theta")),
            "mrope_section": tuple(rope["mrope_section"]) if "mrope_section" in rope else None,
            "codec_pad_id": c.get("tts_codec_pad_token_id"),
            "codec_bos_id": c.get("tts_codec_start_token_id"),
            "codec_eos_id": c.get("tts_codec_end_token_id"),
            "codec_mask_id": c.get("tts_codec_mask_token_id"),
            "text_eos_id": c.get("tts_text_end_token_id"),
            "text_pad_id": c.get("tts_text_pad_token_id"),
            "audio_id": c.get("audio_token_index"),
            "image_id": c.get("image_token_index"),
            "video_id": c.get("video_token_index"),
        }
        return cls(
            embedding_size=c["embedding_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            num_kv_heads=c["num_key_value_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            vocab_size=c["vocab_size"],
            **{k: v for k, v in optional.items() if v is not None},
        )
