"""One request's talker state: what the thinker has streamed so far, and the codes generated from it."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from omnitalk.engine.talker.sampling import TalkerSampling


@dataclass(slots=True, eq=False)
class TalkerSequence:
    """Fed by the thinker's stream (`add_rows`, `add_tokens`, `thinker_done`), stepped by `Talker.step`.

    Step 0 (prefill) needs the rows of positions 0..L (the prompt and g0 fed back) and token g0. Decode
    step j >= 1 needs row L+j and token g_j, or, once the thinker is done with N tokens, nothing: step
    N-1 reads text_eos and later steps text_pad. So the talker trails the thinker by one token.
    """

    request_id: str
    prompt_ids: list[int]
    speaker: str = "Chelsie"
    sampling: TalkerSampling = field(default_factory=TalkerSampling)
    # The thinker's TMRoPE positions [3, L] of the prompt (ThinkerStart.positions); None: 1-D, right for text
    # and audio prompts only: an image or video prompt needs the thinker's.
    positions: torch.Tensor | None = None
    # A Realtime session's request: the session's key and the thinker's content key of every prompt position
    # (ThinkerStart.content_keys). With both, its full prompt blocks are cached for the session's later turns.
    session: str | None = None
    content_keys: tuple[bytes, ...] | None = None
    # streamed by the thinker
    tokens: list[int] = field(default_factory=list)  # generated text ids g_0, g_1, ...
    num_rows: int = 0  # hidden-state rows received: positions 0 .. num_rows - 1
    thinker_finished: bool = False
    # talker state
    codes: list[int] = field(default_factory=list)
    num_cached: int = 0  # KV cache rows written; 0 until the prefill
    rope_delta: int = 0  # decode position = cache index + rope_delta
    slot: int | None = None  # its row of the talker's per-sequence state (one of max_seqs), while added
    block_table: list[int] = field(default_factory=list)  # KV pool blocks holding cache rows 0..num_cached-1
    num_reserved_blocks: int = 0  # blocks promised at admission: its worst-case length beyond the cached prefix
    block_hashes: list[bytes] = field(default_factory=list)  # of its full prompt blocks (Talker.check), if cacheable
    num_prefix_tokens: int = 0  # leading cache rows served from cached blocks, not computed by its prefill
    finish_reason: str | None = None  # "stop", "length", "abort", or "empty" (the thinker said < 2 tokens)
    # received, not yet consumed: chunks as they came, the first one read from _offset on (no copies per step)
    _rows: deque[torch.Tensor] = field(default_factory=deque, init=False, repr=False)
    _offset: int = field(default=0, init=False, repr=False)

    def add_rows(self, first_position: int, rows: torch.Tensor) -> None:
        """Rows [n, H] of thinker positions first_position.. (last-layer hidden states, post-norm).

        Positions already received are skipped (a preempted thinker re-sends them); a gap is an error.
        """
        if rows.ndim != 2:
            raise ValueError(f"rows must be [n, hidden], got {tuple(rows.shape)}")
        if first_position > self.num_rows:
            raise ValueError(f"rows from position {first_position}, but only {self.num_rows} received")
        rows = rows[self.num_rows - first_position :]
        if len(rows):
            self._rows.append(rows)
            self.num_rows += len(rows)

    def add_tokens(self, token_ids: list[int]) -> None:
        self.tokens.extend(token_ids)

    def thinker_done(self) -> None:
        """Every row and token has been added: the last token is never fed back, so it has no row."""
        self.thinker_finished = True
        if len(self.tokens) < 2 and self.num_cached == 0 and self.finish_reason is None:
            self.finish_reason = "empty"  # no row for g0: nothing to condition the talker on

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        return self.num_cached > 0

    @property
    def ready(self) -> bool:
        """The input of the next step exists."""
        if self.finished:
            return False
        prompt_len, step = len(self.prompt_ids), len(self.codes)
        if not self.prefilled:
            return bool(self.tokens) and self.num_rows > prompt_len
        fed_back = self.num_rows > prompt_len + step and len(self.tokens) > step
        return fed_back or (self.thinker_finished and step >= len(self.tokens) - 1)

    def take_prefill(self) -> tuple[torch.Tensor, list[int]]:
        """Rows [L+1-P, H] of the prompt from P = num_prefix_tokens on and g0, with their token ids; the first P
        rows are dropped unread (their keys and values are cached)."""
        start = self._skip_prefix()
        return self._take(len(self.prompt_ids) + 1 - start), [*self.prompt_ids[start:], self.tokens[0]]

    def take_prompt(self) -> tuple[torch.Tensor, list[int]]:
        """Rows [L-P, H] of the prompt from P = num_prefix_tokens on, with their token ids: the prefill of a
        prompt-only sequence (the talker's prefill ahead), which has no g0."""
        start = self._skip_prefix()
        return self._take(len(self.prompt_ids) - start), self.prompt_ids[start:]

    def _skip_prefix(self) -> int:
        """Drops the rows of the cached prefix unread; returns its length."""
        for _ in self._read(self.num_prefix_tokens):
            pass
        return self.num_prefix_tokens

    def take_decode(self, text_eos: int, text_pad: int) -> tuple[torch.Tensor | None, int]:
        """The text side of decode step j: (row [H] of g_j, g_j), or (None, text_eos / text_pad) once done."""
        step = len(self.codes)
        if self.num_rows > len(self.prompt_ids) + step and len(self.tokens) > step:
            return self._take(1)[0], self.tokens[step]
        return None, text_eos if step == len(self.tokens) - 1 else text_pad

    def _take(self, n: int) -> torch.Tensor:
        """The next n rows (n >= 1)."""
        parts = list(self._read(n))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _read(self, n: int) -> Iterator[torch.Tensor]:
        """The next n rows, as views of the chunks they arrived in; a chunk is dropped once read to its end, so
        consumed rows can be freed."""
        while n:
            chunk = self._rows[0]
            part = chunk[self._offset : self._offset + n]
            n -= len(part)
            self._offset += len(part)
            if self._offset == len(chunk):
                self._rows.popleft()
                self._offset = 0
            yield part
