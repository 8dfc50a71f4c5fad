"""A stream's queue, in and out: the items the row receiver and the output pump put in it, and the order in which
a stream hands them out (ThinkerStart with the prompt's positions, rows once per position, ThinkerDone last)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from omnitalk.engine.thinker.events import HiddenStates, ThinkerDone, ThinkerEvent, ThinkerStart
from omnitalk.engine.thinker.receiver import Decoded


@dataclass(frozen=True, slots=True)
class Failed:
    error: BaseException


@dataclass(frozen=True, slots=True)
class Positions:
    positions: torch.Tensor


@dataclass(frozen=True, slots=True)
class Arrived:
    """What one drain of the row socket brought a stream, in arrival order: one queue item, one wake-up."""

    items: list[Positions | HiddenStates]


def by_stream(messages: list[Decoded]) -> tuple[dict[str, list[Positions | HiddenStates]], list[str]]:
    """The positions and rows of `messages` per stream, in message order, and the streams named as failed."""
    arrived: dict[str, list[Positions | HiddenStates]] = {}
    failed: list[str] = []
    for spans, prompts, lost in messages:
        failed += lost
        for stream_id, positions in prompts.items():
            arrived.setdefault(stream_id, []).append(Positions(positions))
        for span, rows in spans:
            arrived.setdefault(span.stream_id, []).append(HiddenStates(span.first_position, rows))
    return arrived, failed


def fail(queue: asyncio.Queue, error: BaseException) -> None:
    """Ends the stream with `error` next, even when its queue is full: what is queued is no use any more."""
    while queue.full():
        queue.get_nowait()
    queue.put_nowait(Failed(error))


async def ordered(queue: asyncio.Queue, with_rows: bool) -> AsyncIterator[ThinkerEvent]:
    """ThinkerStart first (with the prompt's positions when rows are wanted); rows once per position, in
    order; ThinkerDone last, after every row is out. Rows and positions travel on another socket than
    the tokens, so either may come first: everything waits until the start can be announced."""
    start: ThinkerStart | None = None
    positions: torch.Tensor | None = None
    announced = False
    held: list[ThinkerEvent] = []
    next_position = 0
    done: ThinkerDone | None = None
    while done is None or (with_rows and next_position < done.num_prompt_tokens + done.num_generated_tokens - 1):
        for event in with_the_rest(await queue.get(), queue):
            match event:
                case Failed():
                    raise event.error
                case Positions():
                    positions = event.positions
                case HiddenStates():
                    skip = next_position - event.first_position  # recompute after preemption re-sends positions
                    end = event.first_position + event.rows.shape[0]
                    if end <= next_position:
                        continue
                    if skip > 0:
                        event = HiddenStates(next_position, event.rows[skip:])
                    next_position = end
                    held.append(event)
                case ThinkerStart():
                    start = event
                case ThinkerDone():
                    done = event
                case _:
                    held.append(event)
        # A streaming-input request's positions come again with every chunk: wait for the whole prompt's.
        covered = positions is not None and start is not None and positions.shape[1] == len(start.prompt_token_ids)
        if not announced and start is not None and (covered or not with_rows):
            yield dataclasses.replace(start, positions=positions)
            announced = True
        if announced:
            for item in held:
                yield item
            held.clear()
    yield done


def with_the_rest(item, queue: asyncio.Queue) -> list:
    """`item` and every item queued after it, the items of an `Arrived` in place: one wake-up takes them all."""
    items = []
    while True:
        if isinstance(item, Arrived):
            items += item.items
        else:
            items.append(item)
        if queue.empty():
            return items
        item = queue.get_nowait()


def leading_rows(queue: asyncio.Queue, limit: int) -> torch.Tensor | None:
    """The rows a dropped session's stream holds for positions 0 onwards, without a gap, at most `limit` (one
    copy: they are views of ZMQ frames); None if it holds none from position 0."""
    rows: list[torch.Tensor] = []
    end = 0
    items = with_the_rest(queue.get_nowait(), queue) if not queue.empty() else []
    for item in items:
        if isinstance(item, HiddenStates) and item.first_position <= end < item.first_position + len(item.rows):
            rows.append(item.rows[end - item.first_position : limit - item.first_position])
            end = min(item.first_position + len(item.rows), limit)
        if end >= limit:
            break
    return torch.cat(rows) if rows else None
