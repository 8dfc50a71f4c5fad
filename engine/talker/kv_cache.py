"""The talker's preallocated KV cache: one slot per live request, lowest free slot first."""

from __future__ import annotations

import heapq

import torch


class KVCache:
    """`data` is [layers, 2 (k, v), slots, kv_heads, max_len, head_dim]; a request owns one slot's rows."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        # Zeros, not empty: masked-out keys still enter the score matmul, and NaN garbage would poison it.
        self.data = torch.zeros(num_layers, 2, num_slots, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.max_len = max_len
        self._free = list(range(num_slots))  # a heap: low slots first keeps busy slots contiguous

    @property
    def num_slots(self) -> int:
        return self.data.shape[2]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.num_slots} talker slots are in use")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        heapq.heappush(self._free, slot)
