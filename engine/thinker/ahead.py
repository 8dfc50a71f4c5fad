"""An ingest session's prompt rows passed on to the talker as they arrive, so that it prefills them ahead.

The rows of a streaming-input session reach its stream's queue as each chunk is prefilled (the session's stored
rows of the head first), but its request reads them only once the turn ends. `AheadFeed` sees every item put in the
queue (`ObservedQueue`) and hands the talker (`TalkerAhead`: the speech engine) each run of positions whose row,
TMRoPE positions, token id and content key are all known, in order from position 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import torch

from omnitalk.engine.talker.ahead import PromptPart
from omnitalk.engine.thinker.events import HiddenStates
from omnitalk.engine.thinker.ordering import Arrived, Positions

log = logging.getLogger(__name__)


class TalkerAhead(Protocol):
    """Where an ingested prompt's positions go: `SpeechEngine.prefill_ahead` and `cancel_ahead`."""

    def prefill_ahead(self, key: str, session: str, part: PromptPart) -> None: ...

    def cancel_ahead(self, key: str) -> None: ...


class ObservedQueue(asyncio.Queue):
    """A stream's queue that shows `observe` every item put in it, after queueing it."""

    def __init__(self, maxsize: int, observe: Callable[[object], None]) -> None:
        super().__init__(maxsize)
        self._observe = observe

    def put_nowait(self, item: object) -> None:
        super().put_nowait(item)
        self._observe(item)


class AheadFeed:
    """One ingest session's prompt, passed on to the talker as far as it is known; `stop` ends it (idempotent)."""

    def __init__(self, talker: TalkerAhead, key: str, session: str) -> None:
        self._talker, self._key, self._session = talker, key, session
        self._ids: list[int] = []
        self._keys: list[bytes] = []
        self._positions: torch.Tensor | None = None  # the latest announced, [3, prompt so far]
        self._rows: list[HiddenStates] = []  # received from position `_sent` on, in order, not yet passed on
        self._num_rows = 0  # rows received: positions 0 .. _num_rows - 1
        self._sent = 0  # positions passed on
        self._sealed = False
        self._cancelled = False

    @property
    def num_passed_on(self) -> int:
        """Leading prompt positions handed to the talker so far."""
        return self._sent

    def known(self, token_ids: list[int], content_keys: list[bytes]) -> None:
        """The prompt's ids and content keys so far (they grow chunk by chunk, before vLLM sees the chunk)."""
        self._ids, self._keys = token_ids, content_keys
        self._pass_on()

    def observe(self, item: object) -> None:
        """An item put in the session's stream: its rows and positions are taken; anything else is ignored."""
        for part in item.items if isinstance(item, Arrived) else [item]:
            if isinstance(part, Positions):
                self._positions = part.positions
            elif isinstance(part, HiddenStates):
                self._add_rows(part)
        self._pass_on()

    def seal(self) -> None:
        """Nothing more is passed on (what was passed on is still prefilled)."""
        self._sealed = True
        self._rows.clear()

    def stop(self) -> None:
        """Sealed, and the talker forgets the prompt (its cached blocks stay); idempotent."""
        self.seal()
        if not self._cancelled:
            self._cancelled = True
            self._talker.cancel_ahead(self._key)

    def _add_rows(self, rows: HiddenStates) -> None:
        skip = self._num_rows - rows.first_position  # recompute after preemption re-sends positions
        if self._sealed or skip >= len(rows.rows):
            return
        if skip < 0:  # a gap: what follows cannot be placed
            self.seal()
            return
        self._rows.append(HiddenStates(self._num_rows, rows.rows[skip:]))
        self._num_rows += len(rows.rows) - skip

    def _pass_on(self) -> None:
        """Every position up to the first whose row, position, id or key is still missing. It runs inside the row
        receiver's callback, so nothing may escape: on any error the feed is sealed (the answer prefills the rest)."""
        if self._sealed or self._positions is None:
            return
        try:
            self._hand_over()
        except Exception:
            log.exception("passing %s on to the talker failed; it prefills the rest with the answer", self._key)
            self.seal()

    def _hand_over(self) -> None:
        end = min(self._num_rows, len(self._keys), len(self._ids), self._positions.shape[1])
        while self._rows and self._sent < end:
            first, rows = self._sent, self._rows[0].rows
            stop = min(first + len(rows), end)
            ids, keys, positions = self._ids[first:stop], tuple(self._keys[first:stop]), self._positions[:, first:stop]
            part = PromptPart(first, ids, positions, keys, rows[: stop - first])
            self._talker.prefill_ahead(self._key, self._session, part)
            self._sent = stop
            if stop - first == len(rows):
                self._rows.pop(0)
            else:
                self._rows[0] = HiddenStates(stop, rows[stop - first :])
