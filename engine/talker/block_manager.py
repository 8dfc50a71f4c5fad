"""The talker's KV pool bookkeeping: fixed-size blocks shared by every sequence, reserved at admission.

No tensors here: the pool tensor lives in the model runner, indexed by the block ids handed out here.
"""

from __future__ import annotations

from collections import deque

from omnitalk.engine.talker.sequence import TalkerSequence


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Sequences reserve their worst-case length when admitted and take blocks as they grow.

    Reserving up front means an admitted sequence can never run out of cache mid-answer (nothing to
    preempt, no audio stalls); a new sequence waits until enough reserved tokens are released.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs blocks: {num_blocks} blocks of {block_size} tokens")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._num_reserved = 0  # blocks promised to admitted sequences, taken or not

    @property
    def num_free_tokens(self) -> int:
        """Tokens not reserved by any admitted sequence."""
        return (self.num_blocks - self._num_reserved) * self.block_size

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_reserve(self, num_tokens: int) -> bool:
        return num_blocks_for(num_tokens, self.block_size) <= self.num_blocks - self._num_reserved

    def reserve(self, seq: TalkerSequence, num_tokens: int) -> None:
        if seq.num_reserved_blocks or seq.block_table:
            raise ValueError(f"sequence {seq.request_id} already holds talker blocks")
        if not self.can_reserve(num_tokens):
            raise RuntimeError(f"the talker pool has {self.num_free_tokens} free tokens, {num_tokens} are needed")
        seq.num_reserved_blocks = num_blocks_for(num_tokens, self.block_size)
        self._num_reserved += seq.num_reserved_blocks

    def append(self, seq: TalkerSequence, num_tokens: int) -> None:
        """Blocks for `seq` to hold `num_tokens` cached tokens in all; never beyond its reservation."""
        needed = num_blocks_for(num_tokens, self.block_size) - len(seq.block_table)
        if len(seq.block_table) + needed > seq.num_reserved_blocks:
            raise RuntimeError(f"sequence {seq.request_id} outgrew its reservation of {seq.num_reserved_blocks} blocks")
        for _ in range(needed):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: TalkerSequence) -> None:
        """Idempotent."""
        self._free.extend(seq.block_table)
        self._num_reserved -= seq.num_reserved_blocks
        seq.block_table.clear()
        seq.num_reserved_blocks = 0
