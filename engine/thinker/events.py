"""What the thinker streams for a request, in order: ThinkerStart, text and rows interleaved, ThinkerDone."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ThinkerStart:
    prompt_token_ids: list[int]
    # The TMRoPE positions [3, L] the thinker gave the prompt (requests with hidden states only); the
    # talker's own positions continue from them.
    positions: torch.Tensor | None = None
    # A session request's content keys of the prompt's positions, in order (conversation.content_keys), else None.
    content_keys: tuple[bytes, ...] | None = None


@dataclass(frozen=True, slots=True)
class ThinkerText:
    token_ids: list[int]
    text: str  # detokenized delta


@dataclass(frozen=True, slots=True)
class HiddenStates:
    """Rows for positions first_position .. first_position + len(rows) - 1, each position exactly once.

    Positions 0..L-1 are the prompt; position L+k is generated token k fed back (the last generated token
    is never fed back, so a request ends with L + N - 1 rows).
    """

    first_position: int
    rows: torch.Tensor  # [n, hidden] in the model's dtype, on CPU


@dataclass(frozen=True, slots=True)
class ThinkerDone:
    finish_reason: str  # "stop", "length" or "abort"
    num_prompt_tokens: int
    num_generated_tokens: int
    num_cached_tokens: int = 0  # prompt positions vLLM served from its prefix cache


ThinkerEvent = ThinkerStart | ThinkerText | HiddenStates | ThinkerDone
