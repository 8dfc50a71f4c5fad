"""vLLM's Qwen2.5-Omni thinker, fixed where it departs from transformers: TMRoPE positions and the merge of
audio-in-video embeddings in chunked prefill."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_omni_thinker import Qwen2_5OmniThinkerForConditionalGeneration
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.multimodal.utils import get_mm_embedding_modalities


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


def merge_by_modality(
    embeds: torch.Tensor,
    multimodal_embeddings: list[torch.Tensor],
    input_ids: torch.Tensor,
    is_multimodal: torch.Tensor,
    *,
    video_token: int,
    audio_token: int,
) -> torch.Tensor:
    """Scatters each modality's embeddings, in order, into its own placeholder rows of `embeds` (in place).
    Every tensor is on `embeds`' device; `masked_scatter_` needs no count on the host, so nothing syncs."""
    is_video = is_multimodal & (input_ids == video_token)
    is_audio = is_multimodal & (input_ids == audio_token)
    masks = {"video": is_video, "audio": is_audio, "image": is_multimodal & ~is_video & ~is_audio}
    modalities = get_mm_embedding_modalities(multimodal_embeddings)
    for modality, mask in masks.items():
        group = [e for e, m in zip(multimodal_embeddings, modalities, strict=True) if m == modality]
        if group:
            embeds.masked_scatter_(mask.unsqueeze(-1), torch.cat(group).to(embeds.dtype))
    return embeds


class OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerForConditionalGeneration):
    """Overrides two methods; the inherited `_processor_factory` keeps vLLM's multimodal processor."""

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: Any = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # vLLM's own override copies input_ids to the host to find interleaved audio-in-video tokens and,
        # when a chunk holds `A...A V...V`, fills audio rows with video embeddings. Merging by modality,
        # on the device, is right in every order and needs no host copy.
        if not multimodal_embeddings or is_multimodal is None:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        embeds = self._embed_text_input_ids(
            input_ids, self.get_language_model().embed_input_ids, is_multimodal=is_multimodal
        )
        return merge_by_modality(
            embeds,
            multimodal_embeddings,
            input_ids,
            is_multimodal.to(input_ids.device, non_blocking=True),  # the V1 runner's mask is in pinned host memory
            video_token=self.config.video_token_index,
            audio_token=self.config.audio_token_index,
        )

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """An audio item's positions continue the line of the text around it, so only images and videos start a
        piece of their own: a session's prompt of a hundred audio items is one line (the runner recomputes it
        over the whole grown prompt at every streaming-input chunk)."""
        pieces: list[np.ndarray] = []
        st = 0  # index of the first token not yet given a position
        start = 0  # the position token `st` takes on a line: the last piece's max + 1

        def line_to(end: int) -> None:
            nonlocal st, start
            if end > st:
                pieces.append(_line(end - st, start))
                st, start = end, start + end - st

        for offset, modality, data in self.iter_mm_features(mm_features):
            if modality == "audio":
                continue
            line_to(offset)
            if modality == "video" and data["use_audio_in_video"]:
                # vLLM gives `<|audio_bos|>` a position of its own (shifting the block by one) and the eos
                # pair the block's overall max + 1; transformers shares one position per bos/eos pair, the
                # eos one being the last chunk's max + 1.
                block = self._audio_in_video_positions(data, vision_bos=start - 1)
                pieces.extend(block)
                length = sum(piece.shape[1] for piece in block)
            else:
                grid = (data["grid_t"], data["grid_h"], data["grid_w"])
                pieces.append(_grid(*grid, data["t_factor"], start))
                length = int(np.prod(grid))
            st, start = offset + length, int(pieces[-1].max()) + 1
        line_to(len(input_tokens))

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
