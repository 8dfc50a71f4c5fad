"""vLLM's Qwen2.5-Omni thinker, fixed where it departs from transformers: TMRoPE positions and the merge of
audio-in-video embeddings in chunked prefill."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerForConditionalGeneration,
    merge_interleaved_embeddings,
)
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.utils.gpu_sync_debug import gpu_sync_allowed


def _line(length: int, start: int) -> np.ndarray:
    """Text-like positions: the same run `start, start + 1, ...` on all three axes."""
    return np.broadcast_to(np.arange(length), (3, length)) + start


def _grid(grid_t: int, grid_h: int, grid_w: int, t_factor: float, start: int) -> np.ndarray:
    """Image/video positions, t-major: (t * t_factor, h, w) + start."""
    grid = np.indices((grid_t, grid_h, grid_w)).reshape(3, -1)
    grid[0] = (grid[0] * t_factor).astype(np.int64)
    return grid + start


def _chunks(values: np.ndarray, per_chunk: int) -> list[slice]:
    """transformers' `get_chunked_index`: a new chunk starts whenever a value reaches the next multiple."""
    bounds, next_edge = [0], per_chunk
    for i, value in enumerate(values.tolist()):
        if value >= next_edge:
            bounds.append(i)
            next_edge += per_chunk
    bounds.append(len(values))
    return [slice(a, b) for a, b in pairwise(bounds)]


class OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerForConditionalGeneration):
    """Overrides two methods; the inherited `_processor_factory` keeps vLLM's multimodal processor."""

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: Any = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # vLLM merges by modality only when a step's audio and video tokens interleave; a prefill chunk that
        # cuts an audio-in-video block can hold `A...A V...V`, which its fallback fills in embedding order,
        # giving audio rows video embeddings. Merging by modality is right in every order.
        if multimodal_embeddings and is_multimodal is not None:
            with gpu_sync_allowed():
                ids = input_ids.cpu()
            is_video = is_multimodal & (ids == self.config.video_token_index)
            is_audio = is_multimodal & (ids == self.config.audio_token_index)
            if is_video.any() and is_audio.any():
                embeds = self._embed_text_input_ids(
                    input_ids, self.get_language_model().embed_input_ids, is_multimodal=is_multimodal
                )
                return merge_interleaved_embeddings(embeds, multimodal_embeddings, is_video, is_audio, is_multimodal)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        pieces: list[np.ndarray] = []
        st = 0  # index of the first token not yet given a position

        def next_start() -> int:
            return int(pieces[-1].max()) + 1 if pieces else 0

        for offset, modality, data in self.iter_mm_features(mm_features):
            if offset > st:
                pieces.append(_line(offset - st, next_start()))
            if modality == "audio":
                length = self._compute_audio_token_count(data["audio_feature_length"])
                pieces.append(_line(length, next_start()))
            elif modality == "video" and data["use_audio_in_video"]:
                # vLLM gives `<|audio_bos|>` a position of its own (shifting the block by one) and the eos
                # pair the block's overall max + 1; transformers shares one position per bos/eos pair, the
                # eos one being the last chunk's max + 1.
                block = self._audio_in_video_positions(data, vision_bos=next_start() - 1)
                pieces.extend(block)
                length = sum(piece.shape[1] for piece in block)
            else:
                grid = (data["grid_t"], data["grid_h"], data["grid_w"])
                pieces.append(_grid(*grid, data["t_factor"], next_start()))
                length = int(np.prod(grid))
            st = offset + length
        if st < len(input_tokens):
            pieces.append(_line(len(input_tokens) - st, next_start()))

        positions = np.concatenate(pieces, axis=1)
        return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)

    def _audio_in_video_positions(self, data: dict[str, Any], vision_bos: int) -> list[np.ndarray]:
        """Positions of `<|audio_bos|> (V A)... <|audio_eos|><|vision_eos|>` as transformers lays them out."""
        start = vision_bos + 1
        video = _grid(data["grid_t"], data["grid_h"], data["grid_w"], data["t_factor"], start)
        audio = _line(self._compute_audio_token_count(data["audio_feature_length"]), start)
        per_chunk = int(self.config.position_id_per_seconds * self.config.seconds_per_chunk)
        video_chunks = _chunks(video[0] - start, per_chunk)
        audio_chunks = _chunks(audio[0] - start, per_chunk)
        block = [_line(1, vision_bos)]  # `<|audio_bos|>`
        for j in range(max(len(video_chunks), len(audio_chunks))):
            if j < len(video_chunks):
                block.append(video[:, video_chunks[j]])
            if j < len(audio_chunks):
                block.append(audio[:, audio_chunks[j]])
        eos = int(block[-1].max()) + 1
        return [*block, np.full((3, 2), eos)]  # `<|audio_eos|><|vision_eos|>` share one position
