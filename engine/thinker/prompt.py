"""Turns a conversation into a vLLM prompt: the Omni chat template's text plus the media it refers to."""

from __future__ import annotations

import uuid
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


class _ControlTokenTexts:
    """Message text is text: a `<|im_end|>` a user writes must not become the control token. Texts that hold a
    token string are rendered as markers, and the prompt then goes to vLLM as ids, those texts encoded with
    `split_special_tokens`; any other prompt stays text, tokenised by vLLM exactly as before."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.texts = tokenizer, []
        self.tokens = tuple(tokenizer.added_tokens_encoder)
        self.marker = f"\x00omnitalk-text-{uuid.uuid4().hex}-"

    def part(self, part: Part) -> dict[str, Any]:
        if isinstance(part, Text) and any(token in part.text for token in self.tokens):
            self.texts.append(part.text)
            return {"type": "text", "text": f"{self.marker}{len(self.texts) - 1}\x00"}
        return _part(part)

    def prompt(self, rendered: str) -> dict[str, Any]:
        if not self.texts:
            return {"prompt": rendered}
        encode = self.tokenizer.encode
        pieces = rendered.split(self.marker)
        ids = encode(pieces[0], add_special_tokens=False)
        for piece in pieces[1:]:
            index, _, rest = piece.partition("\x00")
            ids += encode(self.texts[int(index)], add_special_tokens=False, split_special_tokens=True)
            ids += encode(rest, add_special_tokens=False)
        return {"prompt_token_ids": ids}


def build_prompt(messages: tuple[Message, ...], tokenizer: Any, *, use_audio_in_video: bool) -> dict[str, Any]:
    """A vLLM prompt dict (text, or ids when message text holds control-token strings); media lists follow the
    order in which the parts appear."""
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
    texts = _ControlTokenTexts(tokenizer)
    conversation = [{"role": m.role, "content": [texts.part(p) for p in m.content]} for m in messages]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    media = {"audio": audios, "image": images, "video": [v.frames for v in videos]}
    prompt: dict[str, Any] = texts.prompt(text)
    if any(media.values()):
        prompt["multi_modal_data"] = {kind: items for kind, items in media.items() if items}
        prompt["mm_processor_kwargs"] = {"use_audio_in_video": use_audio_in_video}
        if audios:
            prompt["mm_processor_kwargs"] |= audio_feature_kwargs([samples for samples, _ in audios])
    return prompt
