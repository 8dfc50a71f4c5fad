"""Synthetic talker inputs: a thinker stream of random rows, for tests that need no thinker."""

from __future__ import annotations

import hashlib

import torch

from omnitalk.engine.talker import Talker, TalkerSampling, TalkerSequence

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


class Conversation:
    """A session's thinker side, synthetic: a row, a content key and TMRoPE positions for every position, so that a
    turn's prompt is any prefix of it (the rows of equal keys are equal, as the thinker's session rows are)."""

    def __init__(self, name: str, length: int, seed: int) -> None:
        self.rows = torch.randn(length, WIDTH, generator=torch.Generator().manual_seed(seed))
        keys, previous = [], name.encode()
        for i in range(length):
            previous = hashlib.blake2b(previous + i.to_bytes(8, "little"), digest_size=16).digest()
            keys.append(previous)
        self.keys = tuple(keys)
        t = torch.arange(length)
        self.positions = torch.stack([t, t + (t // 7) % 3, t + t % 5])  # 3-D, as an image's: rope delta > 0

    def turn(self, name: str, prompt_len: int, codes: int, session: str | None = "s") -> TalkerSequence:
        """The talker's sequence of a turn with a `prompt_len` prompt; without a session, it is computed whole."""
        keys = self.keys[:prompt_len] if session is not None else None
        sampling = TalkerSampling(temperature=0.0, max_tokens=codes)
        seq = TalkerSequence(name, [AUDIO_ID] * prompt_len, "Chelsie", sampling, self.positions[:, :prompt_len],
                             session, keys)  # fmt: skip
        seq.add_rows(0, self.rows[: prompt_len + codes])
        seq.add_tokens(list(range(1000, 1001 + codes)))
        seq.thinker_done()
        return seq


def run(talker: Talker, *seqs: TalkerSequence) -> list[torch.Tensor]:
    """Adds `seqs` (those not added yet) and steps them together to the end; each one's logits, step by step."""
    for seq in seqs:
        if seq.slot is None:
            talker.add(seq)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    while live := [(i, seq) for i, seq in enumerate(seqs) if not seq.finished]:
        talker.step([seq for _, seq in live])
        for row, (i, _) in enumerate(live):
            logits[i].append(talker.last_logits[row])
    return [torch.stack(rows) for rows in logits]
