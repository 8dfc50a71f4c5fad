"""How much of the thinker's context window a conversation takes, and the answer budget that leaves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omnitalk.engine import media
from omnitalk.engine.request import Audio, Message
from omnitalk.engine.thinker.prompt import audio_token_count, build_prompt

_PLACEHOLDERS = ("<|AUDIO|>", "<|IMAGE|>", "<|VIDEO|>")  # each expands to its media's tokens in the thinker


@dataclass(frozen=True, slots=True)
class PromptSize:
    text_tokens: int  # the prompt's tokens other than media placeholders' expansions
    audio_tokens: int  # the audio encoder's output tokens for the input audio

    @property
    def known_tokens(self) -> int:
        """A lower bound of the prompt's length: image and video tokens are known only to the engine."""
        return self.text_tokens + self.audio_tokens


def prompt_size(messages: tuple[Message, ...], tokenizer: Any, use_audio_in_video: bool = False) -> PromptSize:
    prompt = build_prompt(messages, tokenizer, use_audio_in_video=use_audio_in_video)
    placeholders = set(tokenizer.convert_tokens_to_ids(list(_PLACEHOLDERS)))
    ids = prompt.get("prompt_token_ids") or tokenizer.encode(prompt["prompt"])  # ids: control-token text kept as text
    text = sum(1 for i in ids if i not in placeholders)
    clips = [part for m in messages for part in m.content if isinstance(part, Audio | media.Video)]
    samples = [c.samples if isinstance(c, Audio) else c.audio for c in clips]
    return PromptSize(text, sum(audio_token_count(len(s)) for s in samples if s is not None))


class BudgetError(ValueError):
    """The answer budget asked for does not fit in the context window next to the prompt."""


def answer_budget(requested: int | None, default: int, prompt_tokens: int, max_model_len: int) -> int:
    """The thinker's max_tokens: the requested budget if it fits beside the prompt (BudgetError if not), or the
    default cut to what the context leaves (as vLLM does when a client sets no budget)."""
    left = max_model_len - prompt_tokens
    if requested is None:
        return max(1, min(default, left))
    if requested > left:
        raise BudgetError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the completion). "
            "Please reduce the length of the messages or completion."
        )
    return requested


def first_kept(num_items: int, size: Callable[[int], int], limit: int, retention: float) -> int:
    """Truncation as OpenAI's Realtime defines it: the index of the oldest item kept so that the prompt (the
    instructions, then items[start:], whose length is `size(start)`) fits in `limit` tokens. 0 while everything
    fits; once it does not, the newest items that fill at most `retention` of the room left by the instructions
    (1.0: all of it; less leaves room for the next turns, so that truncation happens less often)."""
    if size(0) <= limit:
        return 0
    instructions = size(num_items)
    target = instructions + retention * max(0, limit - instructions)
    low, high = 1, num_items  # size falls as start grows; find the first start that fits
    while low < high:
        middle = (low + high) // 2
        if size(middle) <= target:
            high = middle
        else:
            low = middle + 1
    return low
