"""Hidden-state rows: the worker-to-engine wire format and the per-request ordering, without an engine."""

from __future__ import annotations

import asyncio

import pytest
import torch

from omnitalk.engine.thinker import rows as wire
from omnitalk.engine.thinker.engine import _Failed, _ordered, _Positions
from omnitalk.engine.thinker.events import HiddenStates, ThinkerDone, ThinkerStart, ThinkerText


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wire_round_trip_keeps_spans_and_exact_values(dtype):
    rows = torch.randn(7, 48).to(dtype)
    spans = [wire.RowSpan("a", 0, 4), wire.RowSpan("b", 12, 3)]
    positions = torch.arange(12).view(3, 4)
    frames = [
        bytes(frame) for frame in wire.encode(spans, rows, [wire.PromptPositions("a", positions.flatten().tolist())])
    ]
    decoded, prompts, failed = wire.decode(frames)
    assert failed == []
    assert [span for span, _ in decoded] == spans
    assert torch.equal(torch.cat([r for _, r in decoded]), rows)
    assert decoded[0][1].dtype == dtype
    assert torch.equal(prompts["a"], positions)


async def drain(events: list) -> list:
    queue: asyncio.Queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    return [event async for event in _ordered(queue, with_rows=True)]


def rows(first: int, n: int) -> HiddenStates:
    return HiddenStates(first, torch.arange(first, first + n, dtype=torch.float32)[:, None])


async def test_rows_that_overtake_the_start_wait_for_it_and_done_waits_for_the_last_row():
    positions = torch.arange(9).view(3, 3)
    text, done = ThinkerText([9], "x"), ThinkerDone("stop", 3, 2)
    out = await drain([_Positions(positions), rows(0, 2), ThinkerStart([1, 2, 3]), rows(2, 1), text, done, rows(3, 1)])
    assert out[0] == ThinkerStart([1, 2, 3], positions) and out[-1] is done
    spans = [(e.first_position, len(e.rows)) for e in out if isinstance(e, HiddenStates)]
    assert spans == [(0, 2), (2, 1), (3, 1)]  # L + N - 1 = 4 rows, then done


async def test_the_start_waits_for_the_prompt_positions_when_rows_are_wanted():
    positions = torch.zeros(3, 1, dtype=torch.long)
    out = await drain(
        [ThinkerStart([1]), ThinkerText([5], "a"), _Positions(positions), rows(0, 1), ThinkerDone("stop", 1, 1)]
    )
    assert isinstance(out[0], ThinkerStart) and out[0].positions is positions
    assert isinstance(out[1], ThinkerText)


async def test_positions_sent_again_after_preemption_are_delivered_once():
    events = [_Positions(torch.zeros(3, 4)), ThinkerStart([1, 2, 3, 4]), rows(0, 3), rows(0, 5), rows(5, 1)]
    out = await drain([*events, ThinkerDone("stop", 4, 3)])
    spans = [(e.first_position, e.rows[:, 0].tolist()) for e in out if isinstance(e, HiddenStates)]
    assert spans == [(0, [0.0, 1.0, 2.0]), (3, [3.0, 4.0]), (5, [5.0])]


async def test_a_failure_reaches_the_consumer():
    with pytest.raises(RuntimeError, match="boom"):
        await drain([_Positions(torch.zeros(3, 1)), ThinkerStart([1]), _Failed(RuntimeError("boom"))])
