"""The talker's KV pool bookkeeping: fixed-size blocks shared by every sequence, reserved at admission, and the
prompt blocks of a session's earlier turns kept for its later ones (prefix caching).

No tensors here: the pool tensor lives in the model runner, indexed by the block ids handed out here.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

from omnitalk.engine.talker.sequence import TalkerSequence


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_hashes(session: str, content_keys: Sequence[bytes], positions: torch.Tensor, block_size: int) -> list[bytes]:
    """One hash per full block of prompt positions, chained: block b's hash covers the session, the thinker's
    content key of its last position (itself a chain over every earlier token and media item) and the TMRoPE
    positions [3, L] of every block up to b. Those are all a prompt position's talker input depends on (its row
    and token come from the thinker's prefix); the voice enters only after the prompt."""
    previous = hashlib.blake2b(session.encode(), digest_size=16).digest()
    hashes = []
    for end in range(block_size, len(content_keys) + 1, block_size):
        block = positions[:, end - block_size : end].contiguous().numpy().tobytes()
        previous = hashlib.blake2b(previous + content_keys[end - 1] + block, digest_size=16).digest()
        hashes.append(previous)
    return hashes


class BlockManager:
    """Sequences reserve their worst-case length when admitted and take blocks as they grow.

    Reserving up front means an admitted sequence can never run out of cache mid-answer (nothing to preempt, no
    audio stalls); a new sequence waits until enough tokens are released.

    Blocks are reference-counted. After its prefill a sequence registers its full prompt blocks under their
    `block_hashes`; a later sequence whose hashes match takes the longest chain of them (one more reference each)
    and computes only the rest. A registered block nobody references stays in the pool, reusable, until a block is
    needed and none is free otherwise: the least recently released goes first. Such blocks count as free.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs blocks: {num_blocks} blocks of {block_size} tokens")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, holding nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, registered; least recent first
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, tuple[bytes, str]] = {}  # registered block -> (hash, session)
        self._sessions: dict[str, set[int]] = {}  # a session's registered blocks
        self._num_used = 0  # blocks some sequence references
        self._num_pending = 0  # blocks promised to admitted sequences, not taken yet

    @property
    def num_free_tokens(self) -> int:
        """Tokens neither held nor reserved by a live sequence (cached blocks nobody holds count as free)."""
        return self._num_available * self.block_size

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks, referenced or not."""
        return len(self._block_of)

    def num_session_blocks(self, session: str) -> int:
        """Blocks registered for `session`, referenced or not."""
        return len(self._sessions.get(session, ()))

    @property
    def _num_available(self) -> int:
        return self.num_blocks - self._num_used - self._num_pending

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest chain of `hashes` registered now."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_reserve(self, num_tokens: int, hashes: Sequence[bytes] = ()) -> bool:
        return self._cost(num_tokens, self.cached_prefix(hashes)) <= self._num_available

    def reserve(self, seq: TalkerSequence, num_tokens: int) -> None:
        """Takes `seq`'s cached prefix (by `seq.block_hashes`) and promises it the rest of `num_tokens`."""
        if seq.num_reserved_blocks or seq.block_table:
            raise ValueError(f"sequence {seq.request_id} already holds talker blocks")
        prefix = self.cached_prefix(seq.block_hashes)
        if self._cost(num_tokens, prefix) > self._num_available:
            raise RuntimeError(f"the talker pool has {self.num_free_tokens} free tokens, {num_tokens} are needed")
        for block in prefix:
            self._hold(block)
        seq.block_table = prefix
        seq.num_prefix_tokens = len(prefix) * self.block_size
        seq.num_reserved_blocks = num_blocks_for(num_tokens, self.block_size) - len(prefix)
        self._num_pending += seq.num_reserved_blocks

    def append(self, seq: TalkerSequence, num_tokens: int) -> None:
        """Blocks for `seq` to hold `num_tokens` cached tokens in all; never beyond its reservation."""
        needed = num_blocks_for(num_tokens, self.block_size) - len(seq.block_table)
        if self._num_own(seq) + needed > seq.num_reserved_blocks:
            raise RuntimeError(f"sequence {seq.request_id} outgrew its reservation of {seq.num_reserved_blocks} blocks")
        for _ in range(needed):
            seq.block_table.append(self._allocate())
            self._num_pending -= 1

    def register(self, seq: TalkerSequence) -> None:
        """After `seq`'s prefill: its full prompt blocks become reusable under their hashes (a hash another
        sequence registered first keeps that one's block). A block whose predecessor is no longer registered (its
        session was forgotten) could never be matched, so none from there on is."""
        if seq.session is None:
            return
        start = seq.num_prefix_tokens // self.block_size
        for i in range(start, len(seq.block_hashes)):
            h, block = seq.block_hashes[i], seq.block_table[i]
            if i and seq.block_hashes[i - 1] not in self._block_of:
                return
            if h not in self._block_of:
                self._block_of[h] = block
                self._hash_of[block] = (h, seq.session)
                self._sessions.setdefault(seq.session, set()).add(block)

    def free(self, seq: TalkerSequence) -> None:
        """Idempotent. The last blocks go back first, so a prefix is evicted from its end."""
        if not seq.num_reserved_blocks:
            return
        self._num_pending -= seq.num_reserved_blocks - self._num_own(seq)
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table.clear()
        seq.num_reserved_blocks = 0

    def forget(self, session: str) -> None:
        """The session ended: its registered blocks are dropped (those a live sequence holds go when it frees)."""
        for block in self._sessions.pop(session, set()):
            self._unregister(block)
            if self._refs[block] == 0:
                del self._evictable[block]
                self._free.append(block)

    def _cost(self, num_tokens: int, prefix: list[int]) -> int:
        """Available blocks a reservation uses: its new blocks, and the cached blocks it revives."""
        revived = sum(1 for block in prefix if self._refs[block] == 0)
        return num_blocks_for(num_tokens, self.block_size) - len(prefix) + revived

    def _num_own(self, seq: TalkerSequence) -> int:
        return len(seq.block_table) - seq.num_prefix_tokens // self.block_size

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]
            self._num_used += 1
        self._refs[block] += 1

    def _allocate(self) -> int:
        """An unreferenced block: a free one, else the least recently released cached one (evicted). One exists
        whenever a reservation is drawn from: used + pending never exceeds the pool."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._unregister(block)
        self._refs[block] = 1
        self._num_used += 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._num_used -= 1
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _unregister(self, block: int) -> None:
        h, session = self._hash_of.pop(block)
        del self._block_of[h]
        blocks = self._sessions.get(session)
        if blocks is not None:
            blocks.discard(block)
            if not blocks:
                del self._sessions[session]
