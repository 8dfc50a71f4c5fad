"""The pieces of a streaming-input request: the head and tail of a turn's prompt, an audio chunk of block items, an
intermediate chunk's sampling, and whether a request's conversation is the one a turn ingested."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from omnitalk.engine.request import Audio, Message, Text
from omnitalk.engine.thinker import rows as wire
from omnitalk.engine.thinker.conversation import (
    AUDIO_PLACEHOLDER,
    BLOCK_ITEM_KWARGS,
    ClipItems,
    features_audio,
    session_prompt,
)
from omnitalk.engine.thinker.prompt import audio_feature_kwargs, build_prompt


def audio_chunk(token_id: int, items: list[torch.Tensor], tail: list[int]) -> dict[str, Any]:
    """A prompt chunk of audio items, each given as features [num_mels, frames] (float32), then `tail` ids. All
    three fields are needed: vLLM's input schema for Qwen2.5-Omni audio requires the mask beside the lengths, and a
    chunk without it fails inside the worker, which kills the EngineCore. The items are laid out as a session's
    requests send them (`conversation.features_audio`, with the same processor kwargs), so an item hashes the same
    (vLLM's prefix cache) whatever request or chunk it travels in."""
    if not items:
        raise ValueError("an audio chunk needs at least one item")
    for features in items:
        if features.ndim != 2 or features.dtype != torch.float32 or features.shape[1] == 0:
            raise ValueError(f"audio features must be [num_mels, frames] float32, got {tuple(features.shape)}")
        if features.shape[0] != items[0].shape[0]:
            raise ValueError("the audio items of a chunk must have the same number of mel bins")
    audio = features_audio(items)
    return {
        "prompt_token_ids": [token_id] * len(items) + list(tail),
        "multi_modal_data": {"audio": audio},
        "mm_processor_kwargs": dict(BLOCK_ITEM_KWARGS),
    }


def prefill_params(tap: str | None):
    """An intermediate chunk's sampling: greedy, one token (vLLM discards it), the tap on when rows are wanted."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra = {wire.TAP_KEY: tap} if tap is not None else None
    return SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.DELTA, extra_args=extra)


def same_messages(a: tuple[Message, ...], b: tuple[Message, ...]) -> bool:
    """Equal conversations: audio by its samples, images and videos by identity (they are the session's own)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.role != y.role or len(x.content) != len(y.content):
            return False
        for p, q in zip(x.content, y.content, strict=True):
            if type(p) is not type(q):
                return False
            if isinstance(p, Audio):  # a Realtime item's samples array is the same object in every turn
                if p.samples is not q.samples and not np.array_equal(p.samples, q.samples):
                    return False
            elif isinstance(p, Text):
                if p != q:
                    return False
            elif p is not q:
                return False
    return True


def turn_prompt(history: tuple[Message, ...], tokenizer: Any, audio_token: int, clips: ClipItems | None):
    """The conversation `history` plus a user turn of audio, as (the head prompt, cut after the new turn's
    `<|audio_bos|>`; the ids after its `<|AUDIO|>`). `clips`: a session's clip items, which earlier clips are sent
    as (the items its requests send); None: as samples."""
    turn = Message("user", (Audio(np.zeros(1, np.float32)),))
    prompt = build_prompt((*history, turn), tokenizer, use_audio_in_video=False)
    if "prompt" in prompt:
        text = prompt["prompt"]
        cut = text.rindex(AUDIO_PLACEHOLDER)
        head: dict[str, Any] = {"prompt": text[:cut]}
        tail = tokenizer.encode(text[cut + len(AUDIO_PLACEHOLDER) :], add_special_tokens=False)
    else:
        ids = prompt["prompt_token_ids"]
        cut = len(ids) - 1 - ids[::-1].index(audio_token)
        head, tail = {"prompt_token_ids": ids[:cut]}, ids[cut + 1 :]
    audios = prompt["multi_modal_data"]["audio"][:-1]
    media = {k: v for k, v in prompt["multi_modal_data"].items() if k != "audio"}
    if audios:
        media["audio"] = audios
    if media:
        head["multi_modal_data"] = media
        head["mm_processor_kwargs"] = {"use_audio_in_video": False}
        if audios:
            head["mm_processor_kwargs"] |= audio_feature_kwargs([samples for samples, _ in audios])
    if clips is not None:
        head = session_prompt(head, clips, audio_token)
    return head, tail
