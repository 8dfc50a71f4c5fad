"""An ingest session's stream as the talker's prefill ahead sees it: every position passed on once, in order, only once
its row, TMRoPE position, id and content key are all known; nothing after the feed is sealed; one cancel."""

from __future__ import annotations

import torch

from omnitalk.engine.talker.ahead import PromptPart
from omnitalk.engine.thinker.ahead import AheadFeed, ObservedQueue
from omnitalk.engine.thinker.events import HiddenStates, ThinkerText
from omnitalk.engine.thinker.ordering import Arrived, Positions


class Talker:
    """Records what the feed hands the speech engine."""

    def __init__(self) -> None:
        self.parts: list[PromptPart] = []
        self.cancelled: list[str] = []

    def prefill_ahead(self, key: str, session: str, part: PromptPart) -> None:
        assert (key, session) == ("t#ingest0", "s")
        self.parts.append(part)

    def cancel_ahead(self, key: str) -> None:
        self.cancelled.append(key)


ROWS = torch.randn(120, 8, generator=torch.Generator().manual_seed(0))
POSITIONS = torch.arange(120).expand(3, -1) + torch.tensor([[0], [1], [2]])
IDS = list(range(1000, 1120))
KEYS = [bytes([k]) * 16 for k in range(120)]


def rows(first: int, end: int) -> HiddenStates:
    return HiddenStates(first, ROWS[first:end])


def passed_on(talker: Talker) -> int:
    """Checks the parts are contiguous from 0 and match the stream; returns how many positions they cover."""
    end = 0
    for part in talker.parts:
        assert part.first_position == end
        stop = end + len(part.token_ids)
        assert part.token_ids == IDS[end:stop] and list(part.content_keys) == KEYS[end:stop]
        assert torch.equal(part.positions, POSITIONS[:, end:stop]) and torch.equal(part.rows, ROWS[end:stop])
        end = stop
    return end


def test_positions_are_passed_on_once_in_order_when_everything_about_them_is_known():
    talker = Talker()
    feed = AheadFeed(talker, "t#ingest0", "s")
    queue = ObservedQueue(100, feed.observe)
    feed.known(IDS[:40], KEYS[:40])  # the head's ids and keys, before vLLM sees it
    queue.put_nowait(rows(0, 30))  # the session's stored rows of the head: no positions yet
    assert passed_on(talker) == 0
    queue.put_nowait(Arrived([Positions(POSITIONS[:, :40]), rows(30, 40)]))
    assert passed_on(talker) == 40
    feed.known(IDS[:90], KEYS[:90])  # a chunk of audio blocks
    queue.put_nowait(Arrived([Positions(POSITIONS[:, :90]), rows(38, 70)]))  # two positions sent again
    queue.put_nowait(ThinkerText([1], "a"))
    assert passed_on(talker) == 70
    queue.put_nowait(Arrived([rows(70, 95)]))  # rows past the known keys wait for them
    assert passed_on(talker) == 90 and feed.num_passed_on == 90
    feed.known(IDS[:120], KEYS[:120])
    assert passed_on(talker) == 90  # their positions are not announced yet
    feed.seal()  # the last chunk: its rows are the answer's
    queue.put_nowait(Arrived([Positions(POSITIONS[:, :120]), rows(95, 120)]))
    assert passed_on(talker) == 90 and queue.qsize() == 6
    feed.stop()
    feed.stop()
    assert talker.cancelled == ["t#ingest0"]


def test_a_gap_in_the_rows_seals_the_feed():
    talker = Talker()
    feed = AheadFeed(talker, "t#ingest0", "s")
    feed.known(IDS, KEYS)
    feed.observe(Arrived([Positions(POSITIONS), rows(0, 20)]))
    feed.observe(rows(30, 50))
    feed.observe(rows(20, 60))
    assert passed_on(talker) == 20 and talker.cancelled == []
