"""The speech gate without the engine: what the talker may read when it must stop before a token."""

from __future__ import annotations

import torch

from omnitalk.engine.omni import _SpeechGate
from omnitalk.engine.thinker.events import HiddenStates

PROMPT = 4
STOP = 99


def rows(first: int, n: int) -> HiddenStates:
    return HiddenStates(first, torch.arange(first, first + n, dtype=torch.float32)[:, None])


def released(gate: _SpeechGate) -> list[int]:
    return [int(v) for event in gate.rows() for v in event.rows[:, 0]]


def test_a_row_waits_for_its_tokens_text_and_none_past_the_stop_token_is_read():
    gate = _SpeechGate(frozenset({STOP}), prompt_len=PROMPT)
    gate.pending.append(rows(0, PROMPT))
    assert released(gate) == [0, 1, 2, 3]  # the prompt's rows pass at once
    gate.pending.append(rows(PROMPT, 2))  # rows of g0 and g1 fed back, before their text (another socket)
    assert released(gate) == []
    assert gate.tokens([10]) == [10]
    assert released(gate) == [4]  # row L (g0 fed back); g1's row waits for g1
    assert gate.tokens([11, STOP, 12]) == [11, STOP]  # the stop token ends what the talker reads
    gate.pending.append(rows(PROMPT + 2, 3))
    assert released(gate) == [5]  # g1's row; the stop token's row, and later ones, are never read
    assert gate.tokens([13]) == [] and released(gate) == []


def test_without_until_every_row_passes_once_its_token_is_known():
    gate = _SpeechGate(frozenset(), prompt_len=PROMPT)
    gate.pending.append(rows(0, PROMPT + 1))
    assert gate.tokens([10, STOP]) == [10, STOP]
    assert released(gate) == [0, 1, 2, 3, 4]
    gate.pending.append(rows(PROMPT + 1, 1))
    assert released(gate) == [5]
