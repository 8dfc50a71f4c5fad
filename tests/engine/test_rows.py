"""Hidden-state rows: the worker-to-engine wire format and the per-request ordering, without an engine."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
import zmq

from omnitalk.engine.thinker import rows as wire
from omnitalk.engine.thinker.events import HiddenStates, ThinkerDone, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.ordering import Arrived, Failed, Positions, by_stream, ordered
from omnitalk.engine.thinker.receiver import MAX_MESSAGES_PER_DRAIN, RowReceiver


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
    return [event async for event in ordered(queue, with_rows=True)]


def rows(first: int, n: int) -> HiddenStates:
    return HiddenStates(first, torch.arange(first, first + n, dtype=torch.float32)[:, None])


async def test_rows_that_overtake_the_start_wait_for_it_and_done_waits_for_the_last_row():
    positions = torch.arange(9).view(3, 3)
    text, done = ThinkerText([9], "x"), ThinkerDone("stop", 3, 2)
    out = await drain([Positions(positions), rows(0, 2), ThinkerStart([1, 2, 3]), rows(2, 1), text, done, rows(3, 1)])
    assert out[0] == ThinkerStart([1, 2, 3], positions) and out[-1] is done
    spans = [(e.first_position, len(e.rows)) for e in out if isinstance(e, HiddenStates)]
    assert spans == [(0, 2), (2, 1), (3, 1)]  # L + N - 1 = 4 rows, then done


async def test_the_start_waits_for_the_prompt_positions_when_rows_are_wanted():
    positions = torch.zeros(3, 1, dtype=torch.long)
    out = await drain(
        [ThinkerStart([1]), ThinkerText([5], "a"), Positions(positions), rows(0, 1), ThinkerDone("stop", 1, 1)]
    )
    assert isinstance(out[0], ThinkerStart) and out[0].positions is positions
    assert isinstance(out[1], ThinkerText)


async def test_positions_sent_again_after_preemption_are_delivered_once():
    events = [Positions(torch.zeros(3, 4)), ThinkerStart([1, 2, 3, 4]), rows(0, 3), rows(0, 5), rows(5, 1)]
    out = await drain([*events, ThinkerDone("stop", 4, 3)])
    spans = [(e.first_position, e.rows[:, 0].tolist()) for e in out if isinstance(e, HiddenStates)]
    assert spans == [(0, [0.0, 1.0, 2.0]), (3, [3.0, 4.0]), (5, [5.0])]


async def test_a_failure_reaches_the_consumer():
    with pytest.raises(RuntimeError, match="boom"):
        await drain([Positions(torch.zeros(3, 1)), ThinkerStart([1]), Failed(RuntimeError("boom"))])


async def test_rows_that_arrived_together_are_delivered_in_order():
    text, done = ThinkerText([9], "x"), ThinkerDone("stop", 3, 2)
    positions = torch.zeros(3, 3, dtype=torch.long)
    out = await drain(
        [Arrived([Positions(positions), rows(0, 3)]), ThinkerStart([1, 2, 3]), text, Arrived([rows(3, 1)]), done]
    )
    assert out[0] == ThinkerStart([1, 2, 3], positions) and out[-1] is done
    assert [(e.first_position, e.rows[:, 0].tolist()) for e in out[1:-1] if isinstance(e, HiddenStates)] == [
        (0, [0.0, 1.0, 2.0]),
        (3, [3.0]),
    ]


def step(*spans: tuple[str, int, int], prompt: str | None = None) -> list[bytes]:
    """One worker step's message: spans (stream, first position, rows), each row filled with its position."""
    data = torch.cat([torch.arange(first, first + n, dtype=torch.float32) for _, first, n in spans])[:, None]
    prompts = [wire.PromptPositions(prompt, list(range(3)))] if prompt else []
    frames = wire.encode([wire.RowSpan(*span) for span in spans], data.expand(-1, 2).contiguous(), prompts)
    return [bytes(frame) for frame in frames]


class Pipe:
    """A RowReceiver and a PUSH socket on it: inproc, so a sent message is queued before send returns."""

    def __init__(self) -> None:
        address = f"inproc://rows-{uuid.uuid4().hex}"
        self.receiver = RowReceiver(address)
        self.push = zmq.Context.instance().socket(zmq.PUSH)
        self.push.connect(address)
        self.drains: list[list] = []

    async def received(self, n: int) -> None:
        async with asyncio.timeout(10):  # a hang guard: a message that never comes fails the test
            while sum(map(len, self.drains)) < n:
                await asyncio.sleep(0.001)

    def close(self) -> None:
        self.push.close(linger=0)
        self.receiver.close()


async def test_one_drain_takes_every_queued_message_and_keeps_each_streams_order():
    pipe = Pipe()
    for message in [
        step(("a", 0, 3), ("b", 0, 2), prompt="a"),
        step(("a", 3, 1), ("b", 2, 1)),
        wire.encode_failure(["c"]),
        step(("c", 5, 1), ("a", 4, 1)),
    ]:
        pipe.push.send_multipart(message)
    task = asyncio.create_task(pipe.receiver.run(pipe.drains.append))
    try:
        await pipe.received(4)
        assert len(pipe.drains) == 1  # queued before the reader started: one drain, one delivery
        arrived, failed = by_stream(pipe.drains[0])
        assert failed == ["c"]
        assert isinstance(arrived["a"][0], Positions) and arrived["a"][0].positions.shape == (3, 1)
        got = {k: [(e.first_position, e.rows[:, 0].tolist()) for e in v[k == "a" :]] for k, v in arrived.items()}
        assert got == {"a": [(0, [0.0, 1.0, 2.0]), (3, [3.0]), (4, [4.0])], "b": [(0, [0.0, 1.0]), (2, [2.0])],
                       "c": [(5, [5.0])]}  # fmt: skip
        pipe.push.send_multipart(step(("a", 5, 1)))  # arrives on an idle socket: its own edge, its own drain
        await pipe.received(5)
        assert len(pipe.drains) == 2 and by_stream(pipe.drains[1])[0]["a"][0].first_position == 5
    finally:
        task.cancel()
        pipe.close()


async def test_a_flood_is_drained_over_several_callbacks_without_losing_a_message():
    pipe = Pipe()
    n = MAX_MESSAGES_PER_DRAIN + 6
    for position in range(n):
        pipe.push.send_multipart(step(("a", position, 1)))
    task = asyncio.create_task(pipe.receiver.run(pipe.drains.append))
    try:
        await pipe.received(n)
        assert [len(d) for d in pipe.drains] == [MAX_MESSAGES_PER_DRAIN, 6]
        positions = [e.first_position for d in pipe.drains for e in by_stream(d)[0]["a"]]
        assert positions == list(range(n))
    finally:
        task.cancel()
        pipe.close()


async def test_a_delivery_that_raises_ends_the_receiver_with_that_error():
    pipe = Pipe()

    def deliver(messages: list) -> None:
        raise RuntimeError("bad rows")

    pipe.push.send_multipart(step(("a", 0, 1)))
    try:
        with pytest.raises(RuntimeError, match="bad rows"):
            async with asyncio.timeout(10):
                await pipe.receiver.run(deliver)
    finally:
        pipe.close()
