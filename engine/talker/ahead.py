"""A prompt whose rows stream in before its request exists (a Realtime turn being ingested): what the talker
prefills ahead into the session's prompt blocks, so that the request's own prefill finds them cached."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnitalk.engine.talker.block_manager import block_hashes
from omnitalk.engine.talker.positions import talker_positions
from omnitalk.engine.talker.sequence import TalkerSequence


@dataclass(frozen=True, slots=True)
class PromptPart:
    """Prompt positions `first_position`.. of a session's prompt: their token ids, TMRoPE positions [3, n], thinker
    content keys and thinker rows [n, H]."""

    first_position: int
    token_ids: list[int]
    positions: torch.Tensor
    content_keys: tuple[bytes, ...]
    rows: torch.Tensor

    def __post_init__(self) -> None:
        n, rows = len(self.token_ids), self.rows
        if len(self.content_keys) != n or tuple(self.positions.shape) != (3, n) or rows.ndim != 2 or len(rows) != n:
            raise ValueError(f"{n} ids with {len(self.content_keys)} keys, positions {tuple(self.positions.shape)}, "
                             f"rows {tuple(rows.shape)}")  # fmt: skip


@dataclass(slots=True, eq=False)
class AheadPrompt:
    """The leading positions of a session's prompt known so far: ids, content keys, TMRoPE positions and rows,
    extended in order (`extend`). Only its full blocks are ever prefilled (`Talker.prefill_ahead`)."""

    request_id: str
    session: str
    token_ids: list[int] = field(default_factory=list)
    content_keys: list[bytes] = field(default_factory=list)
    num_done: int = 0  # leading blocks cached (prefilled ahead or found cached) at the last round
    _positions: list[torch.Tensor] = field(default_factory=list)
    _rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def extend(self, part: PromptPart) -> None:
        """The positions of `part` not known yet; ValueError on a gap."""
        if part.first_position > self.num_tokens:
            raise ValueError(f"prompt positions from {part.first_position}, but only {self.num_tokens} known")
        skip = self.num_tokens - part.first_position
        if skip >= len(part.token_ids):
            return
        self.token_ids += part.token_ids[skip:]
        self.content_keys += part.content_keys[skip:]
        self._positions.append(part.positions[:, skip:])
        self._rows.append(part.rows[skip:])

    def num_blocks(self, block_size: int) -> int:
        return self.num_tokens // block_size

    def hashes(self, block_size: int) -> list[bytes]:
        """The `block_hashes` of its full blocks, as a request with this prompt prefix gets them."""
        positions, _ = talker_positions(self.positions(self.num_tokens), self.num_tokens)
        return block_hashes(self.session, self.content_keys, positions, block_size)

    def positions(self, num_tokens: int) -> torch.Tensor:
        """The TMRoPE positions [3, num_tokens] of its first `num_tokens` positions."""
        return torch.cat(self._positions, dim=1)[:, :num_tokens] if self._positions else torch.zeros(3, 0)

    def sequence(self, num_tokens: int) -> TalkerSequence:
        """A prompt-only sequence of its first `num_tokens` positions, its rows fed (views, not copies)."""
        seq = TalkerSequence(self.request_id, self.token_ids[:num_tokens], positions=self.positions(num_tokens),
                             session=self.session, content_keys=tuple(self.content_keys[:num_tokens]))  # fmt: skip
        first = 0
        for rows in self._rows:
            if first >= num_tokens:
                break
            seq.add_rows(first, rows[: num_tokens - first])
            first += len(rows)
        return seq
