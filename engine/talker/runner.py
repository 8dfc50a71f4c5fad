"""The talker engine: admits sequences into the KV pool and steps any of them in one batched forward."""

from __future__ import annotations

import heapq
from pathlib import Path

import torch

from omnitalk.engine.talker.ahead import AheadPrompt
from omnitalk.engine.talker.block_manager import BlockManager, block_hashes, num_blocks_for
from omnitalk.engine.talker.model import TalkerModel
from omnitalk.engine.talker.model_runner import ModelRunner, default_memory_gib, kv_bytes_per_token
from omnitalk.engine.talker.positions import talker_positions
from omnitalk.engine.talker.sequence import TalkerSequence

BLOCK_SIZE = 32  # tokens per KV block


class Talker:
    """Block manager + model runner. Which sequences step when is the caller's choice (the co-scheduler).

    Capacity has two bounds: `max_seqs` sequences at once (the batch), and the pool's tokens, which every
    sequence reserves for its worst case (prompt + 1 + max_tokens, at most `max_seq_len`) when added, less the
    prompt blocks a session's earlier request left cached (which it shares, and does not recompute).
    Not thread-safe: feed sequences and call `step` from one thread, or under one lock.
    """

    def __init__(
        self,
        model: TalkerModel,
        speakers: dict[str, int],
        max_seqs: int,
        num_blocks: int,
        block_size: int = BLOCK_SIZE,
        max_seq_len: int | None = None,
        enforce_eager: bool = False,
    ) -> None:
        self.model, self.config, self.speakers = model, model.config, speakers
        self.max_seq_len = max_seq_len or self.config.max_position_embeddings
        self.blocks = BlockManager(num_blocks, block_size)
        max_blocks = num_blocks_for(self.max_seq_len, block_size)
        self.runner = ModelRunner(model, speakers, num_blocks, block_size, max_seqs, max_blocks, enforce_eager)
        self.max_seqs = max_seqs
        self._free_slots = list(range(max_seqs))  # a heap
        self.last_logits: torch.Tensor | None = None  # raw codec_head logits [B, V] of the last step's seqs
        self.num_cached_tokens = 0  # prompt positions prefills took from cached blocks instead of computing, ever
        self.num_ahead_tokens = 0  # prompt positions prefilled ahead (`prefill_ahead`), ever

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_seqs: int = 64,
        memory_gib: float | None = None,
        max_seq_len: int | None = None,
        enforce_eager: bool = False,
    ) -> Talker:
        """`memory_gib` sizes the KV pool (None: `default_memory_gib`); `max_seq_len` bounds prompt + 2 + codes
        (None: the talker's max_position_embeddings; the thinker's context window is the right value)."""
        path = Path(path)
        speakers = torch.load(path / "spk_dict.pt", map_location="cpu", weights_only=True)
        voices = {name: int(entry["bos_token"]) for name, entry in speakers.items()}
        model = TalkerModel.from_checkpoint(path, dtype, device)
        budget = default_memory_gib(torch.device(device)) if memory_gib is None else memory_gib
        num_blocks = int(budget * 2**30 // (kv_bytes_per_token(model) * BLOCK_SIZE))
        if num_blocks < 1:
            raise ValueError(f"a talker memory budget of {budget} GiB holds no {BLOCK_SIZE}-token KV block")
        return cls(model, voices, max_seqs, num_blocks, BLOCK_SIZE, max_seq_len, enforce_eager)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_free_tokens(self) -> int:
        return self.blocks.num_free_tokens

    def num_tokens_needed(self, seq: TalkerSequence) -> int:
        """Cache rows `seq` may take: prompt + [speaker bos, g0] + one per code after the first."""
        return min(len(seq.prompt_ids) + 1 + seq.sampling.max_tokens, self.max_seq_len)

    def check(self, seq: TalkerSequence) -> None:
        """Raises ValueError if `seq` can never be added: unknown voice, bad positions or content keys, or too
        long. Computes the hashes of its cacheable prompt blocks, which `can_add` and `add` match."""
        if seq.speaker not in self.speakers:
            raise ValueError(f"unknown speaker {seq.speaker!r}; available: {sorted(self.speakers)}")
        if len(seq.prompt_ids) + 2 > self.max_seq_len:
            raise ValueError(
                f"a prompt of {len(seq.prompt_ids)} tokens leaves no room to speak in the talker's "
                f"{self.max_seq_len}-token context"
            )
        needed, total = self.num_tokens_needed(seq), self.blocks.num_tokens
        if num_blocks_for(needed, self.blocks.block_size) > self.blocks.num_blocks:
            raise ValueError(
                f"speech for a {len(seq.prompt_ids)}-token prompt may need {needed} tokens of talker KV cache, "
                f"more than its whole pool of {total}: raise talker_memory_gib or lower the speech's max_tokens"
            )
        positions, _ = talker_positions(seq.positions, len(seq.prompt_ids))  # fails now, not in a batched step
        if seq.content_keys is not None and len(seq.content_keys) != len(seq.prompt_ids):
            raise ValueError(f"{len(seq.content_keys)} content keys for a {len(seq.prompt_ids)}-token prompt")
        if seq.session is not None and seq.content_keys is not None and not seq.block_hashes:
            seq.block_hashes = block_hashes(seq.session, seq.content_keys, positions, self.blocks.block_size)

    def can_add(self, seq: TalkerSequence) -> bool:
        """A slot and the pool tokens for `seq`'s worst case are free now (after `check`: with its cached prefix)."""
        return bool(self._free_slots) and self.blocks.can_reserve(self.num_tokens_needed(seq), seq.block_hashes)

    def add(self, seq: TalkerSequence) -> None:
        """Reserves `seq`'s pool tokens and a slot; ValueError as `check`, RuntimeError when no room now."""
        self.check(seq)
        if seq.slot is not None or seq.prefilled or seq.finished:
            raise ValueError(f"sequence {seq.request_id} was already added or has finished")
        if not self._free_slots:
            raise RuntimeError(f"all {self.max_seqs} talker slots are in use")
        self.blocks.reserve(seq, self.num_tokens_needed(seq))
        seq.slot = heapq.heappop(self._free_slots)
        self.runner.start(seq.slot, seq.sampling)

    def free(self, seq: TalkerSequence) -> None:
        """Releases the slot and pool tokens (idempotent); an unfinished sequence ends as "abort"."""
        if seq.finish_reason is None:
            seq.finish_reason = "abort"
        if seq.slot is not None:
            self.blocks.free(seq)
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = None

    def forget(self, session: str) -> None:
        """The session ended: its cached prompt blocks are dropped."""
        self.blocks.forget(session)

    @torch.inference_mode()
    def prefill_ahead(self, prompt: AheadPrompt, max_blocks: int) -> int:
        """Prefills at most `max_blocks` of `prompt`'s full blocks past those cached into the session's prefix cache,
        and returns how many it computed. They are held only while computed (a prompt-only sequence, no slot), then
        stay cached, evictable, until a request of the session takes them. Computes nothing when the pool cannot
        spare the blocks now (live streams come first). `prompt.num_done` becomes the blocks cached."""
        hashes = prompt.hashes(self.blocks.block_size)
        cached = len(self.blocks.cached_prefix(hashes))
        end = min(len(hashes), cached + max_blocks)
        num_tokens = end * self.blocks.block_size
        if end == cached or not self.blocks.can_reserve(num_tokens, hashes[:end]):
            prompt.num_done = len(hashes)  # nothing to compute, or no room: it waits for more of the prompt
            return 0
        seq = prompt.sequence(num_tokens)
        seq.block_hashes = hashes[:end]
        self.blocks.reserve(seq, num_tokens)
        try:
            self.blocks.append(seq, num_tokens)
            self.runner.prefill_prompt(seq)
            self.blocks.register(seq)
        finally:
            self.blocks.free(seq)
        prompt.num_done = end
        self.num_ahead_tokens += num_tokens - seq.num_prefix_tokens
        return end - cached

    @torch.inference_mode()
    def step(self, seqs: list[TalkerSequence]) -> list[int | None]:
        """One step of every given sequence (each must be added and `ready`): the new code of each, or None
        when it stopped on a stop code. Sequences that finish (stop or length) release their slot here."""
        if len({id(seq) for seq in seqs}) < len(seqs):
            raise ValueError("a sequence is listed twice")
        for seq in seqs:
            if seq.slot is None or not seq.ready:
                state = "finished" if seq.finished else "not added" if seq.slot is None else "not ready"
                raise ValueError(f"cannot step {seq.request_id}: {state}")
        if not seqs:
            return []
        prefill = [seq for seq in seqs if not seq.prefilled]
        decode = [seq for seq in seqs if seq.prefilled]
        for seq in prefill:
            self.blocks.append(seq, len(seq.prompt_ids) + 2)
        for seq in decode:
            self.blocks.append(seq, seq.num_cached + 1)
        logits = [self.runner.prefill(prefill)] if prefill else []
        for seq in prefill:
            self.blocks.register(seq)
            self.num_cached_tokens += seq.num_prefix_tokens
        logits += [self.runner.decode(decode)] if decode else []
        ordered = prefill + decode
        all_logits = torch.cat(logits)
        codes = self.runner.sample(ordered, all_logits)
        index = {id(seq): i for i, seq in enumerate(ordered)}
        order = [index[id(seq)] for seq in seqs]
        self.last_logits = all_logits[torch.tensor(order, device=self.runner.device)]
        return [self._record(seq, codes[i]) for seq, i in zip(seqs, order, strict=True)]

    def _record(self, seq: TalkerSequence, code: int) -> int | None:
        if code in seq.sampling.stop_codes:
            seq.finish_reason = "stop"
        else:
            seq.codes.append(code)
            if len(seq.codes) >= seq.sampling.max_tokens or seq.num_cached >= self.max_seq_len:
                seq.finish_reason = "length"
        if seq.finished:
            self.free(seq)
        return None if seq.finish_reason == "stop" else code
