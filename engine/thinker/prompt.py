"""Turns a conversation into a vLLM prompt: the Omni chat template's text plus the media it refers to."""

from __future__ import annotations

from typing import Any

import numpy as np

from omnitalk.engine.media import SAMPLE_RATE, Video
from omnitalk.engine.request import Audio, Image, Message, Part, Text

N_FFT = 400  # the Whisper feature extractor's STFT window


def audio_feature_kwargs(clips: list[np.ndarray]) -> dict[str, Any]:
    """Processor kwargs that compute audio features for the real length only.

    Qwen's processor pads every clip to max_length, 300 s by default (most of the cost of a short clip).
    Padding to the longest clip plus half an STFT window gives bit-identical features and lengths: without
    that half window the last frame of a clip whose length is not a multiple of the hop is lost.
    """
    return {"audio_kwargs": {"max_length": max(len(c) for c in clips) + N_FFT // 2}}


# Qwen2.5-Omni's talker was trained with this system prompt; Qwen's model card asks for it when speaking.
SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)


def audio_token_count(num_samples: int) -> int:
    """The thinker's audio tokens for a 16 kHz clip: Whisper frames (hop 160), then two stride-2 reductions
    (as vLLM's and transformers' `_get_feat_extract_output_lengths`)."""
    frames = -(-num_samples // 160)
    return max(0, ((frames - 1) // 2 + 1 - 2) // 2 + 1)


class PromptError(ValueError):
    """A conversation the thinker cannot take; the message says why."""


def _part(part: Part) -> dict[str, Any]:
    match part:
        case Text(text):
            return {"type": "text", "text": text}
        case Audio():
            return {"type": "audio"}
        case Image():
            return {"type": "image"}
        case Video():
            return {"type": "video"}
    raise PromptError(f"unsupported content part {type(part).__name__}")


def build_prompt(messages: tuple[Message, ...], tokenizer: Any, *, use_audio_in_video: bool) -> dict[str, Any]:
    """A vLLM prompt dict; media lists follow the order in which the parts appear."""
    if not messages:
        raise PromptError("the conversation is empty")
    parts = [part for message in messages for part in message.content]
    audios = [(p.samples, SAMPLE_RATE) for p in parts if isinstance(p, Audio)]
    images = [p.image for p in parts if isinstance(p, Image)]
    videos = [p for p in parts if isinstance(p, Video)]
    if use_audio_in_video:
        if audios:
            raise PromptError("use_audio_in_video takes each video's own soundtrack: drop the separate audio parts")
        if not videos or any(v.audio is None for v in videos):
            raise PromptError("use_audio_in_video needs videos that carry their soundtrack")
        audios = [(v.audio, SAMPLE_RATE) for v in videos]
    conversation = [{"role": m.role, "content": [_part(p) for p in m.content]} for m in messages]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    media = {"audio": audios, "image": images, "video": [v.frames for v in videos]}
    prompt: dict[str, Any] = {"prompt": text}
    if any(media.values()):
        prompt["multi_modal_data"] = {kind: items for kind, items in media.items() if items}
        prompt["mm_processor_kwargs"] = {"use_audio_in_video": use_audio_in_video}
        if audios:
            prompt["mm_processor_kwargs"] |= audio_feature_kwargs([samples for samples, _ in audios])
    return prompt
