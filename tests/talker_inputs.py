"""Synthetic talker inputs: a thinker stream of random rows, for tests that need no thinker."""

from __future__ import annotations

import torch

from omnitalk.engine.talker import TalkerSampling, TalkerSequence

AUDIO_ID = 151646  # a placeholder id: its text embedding is zero, so random rows stand in for real prompts
WIDTH = 64  # the tiny thinker's hidden size


def synthetic(name: str, prompt_len: int, codes: int, rows_seed: int = 0, **sampling) -> TalkerSequence:
    """A sequence with its whole thinker stream in: random rows, `codes` + 1 thinker tokens."""
    sampling = {"temperature": 0.0, "max_tokens": codes, **sampling}
    seq = TalkerSequence(name, [AUDIO_ID] * prompt_len, sampling=TalkerSampling(**sampling))
    rows = torch.randn(prompt_len + codes, WIDTH, generator=torch.Generator().manual_seed(rows_seed))
    seq.add_rows(0, rows)
    seq.add_tokens(list(range(1000, 1001 + codes)))
    seq.thinker_done()
    return seq


def pool_gib(tokens: int) -> float:
    return tokens * 512 / 2**30  # the tiny talker: 2 layers x (k, v) x 1 kv head x 32 dims x fp32
