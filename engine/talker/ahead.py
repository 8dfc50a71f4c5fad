"""A prompt whose rows stream in before its request exists (a Realtime turn being ingested): what the talker
prefills ahead into the session's prompt blocks, so that the request's own prefill finds them cached."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnitalk.engine.talker.block_manager import block_hashes
from omnitalk.engine.talker.positions import talker_positions
from omnitalk.engine.talker.sequence import TalkerSequence


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

    def extend(
        self,
        first_position: int,
        token_ids: list[int],
        positions: torch.Tensor,
        content_keys: tuple[bytes, ...],
        rows: torch.Tensor,
    ) -> None:
        """Positions `first_position`.. : their ids, keys, positions [3, n] and rows [n, H]; ValueError on a gap or
        on parts that disagree in length (positions already known are skipped)."""
        n = len(token_ids)
        if len(content_keys) != n or tuple(positions.shape) != (3, n) or rows.ndim != 2 or len(rows) != n:
            raise ValueError(f"{n} ids with {len(content_keys)} keys, positions {tuple(positions.shape)}, "
                             f"rows {tuple(rows.shape)}")  # fmt: skip
        if first_position > self.num_tokens:
            raise ValueError(f"prompt positions from {first_position}, but only {self.num_tokens} known")
        skip = self.num_tokens - first_position
        if skip >= n:
            return
        self.token_ids += token_ids[skip:]
        self.content_keys += content_keys[skip:]
        self._positions.append(positions[:, skip:])
        self._rows.append(rows[skip:])

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
