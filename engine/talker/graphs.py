"""The decode step as CUDA graphs: static input buffers, batches padded to bucketed sizes, one graph per
(batch bucket, block bucket), captured on first use.

Padded rows are harmless by construction: they write their keys into the pool's scratch block, read only
that block, and see one key, so their softmax stays finite; their logits are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True, slots=True)
class DecodeInputs:
    """One decode step of B rows, unpadded. Everything is on the runner's device."""

    embeds: torch.Tensor  # [B, 1, E]
    positions: torch.Tensor  # [B] long, the same on the t, h and w axes
    write: torch.Tensor  # [B] long, pool token index of each row's new key
    block_tables: torch.Tensor  # [B, blocks] long
    context_lens: torch.Tensor  # [B] long, keys each row sees, its new one included


DecodeForward = Callable[[DecodeInputs], torch.Tensor]  # -> logits [B, V] fp32


def batch_bucket(batch: int, max_batch: int) -> int:
    """The smallest bucket that holds `batch` rows; `max_batch` is always a bucket."""
    if not 1 <= batch <= max_batch:
        raise ValueError(f"a decode batch of {batch} rows, outside 1..{max_batch}")
    return next((b for b in BATCH_BUCKETS if batch <= b < max_batch), max_batch)


def block_bucket(blocks: int, max_blocks: int) -> int:
    """The next power of two of `blocks`, capped at `max_blocks`: at most twice the keys read, few graphs."""
    if not 1 <= blocks <= max_blocks:
        raise ValueError(f"{blocks} blocks per row, outside 1..{max_blocks}")
    return min(1 << (blocks - 1).bit_length(), max_blocks)


class DecodeGraphs:
    """Static buffers at the largest shapes; each graph reads leading slices of them."""

    def __init__(
        self,
        forward: DecodeForward,
        max_batch: int,
        max_blocks: int,
        scratch_block: int,
        block_size: int,
        embedding_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.forward, self.max_batch, self.max_blocks = forward, max_batch, max_blocks
        self.scratch_block, self.block_size = scratch_block, block_size
        self.embeds = torch.zeros(max_batch, 1, embedding_size, dtype=dtype, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.write = torch.full((max_batch,), scratch_block * block_size, dtype=torch.long, device=device)
        self.block_tables = torch.full((max_batch, max_blocks), scratch_block, dtype=torch.long, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def load(self, inputs: DecodeInputs) -> tuple[int, int]:
        """Copies `inputs` into the static buffers, padded to their buckets; returns (batch, blocks) buckets."""
        batch, blocks = inputs.block_tables.shape
        key = batch_bucket(batch, self.max_batch), block_bucket(blocks, self.max_blocks)
        padded, width = key
        self.embeds[batch:padded].zero_()
        self.embeds[:batch].copy_(inputs.embeds)
        self.positions[batch:padded].zero_()
        self.positions[:batch].copy_(inputs.positions)
        self.write[batch:padded].fill_(self.scratch_block * self.block_size)
        self.write[:batch].copy_(inputs.write)
        self.block_tables[:padded, :width].fill_(self.scratch_block)
        self.block_tables[:batch, :blocks].copy_(inputs.block_tables)
        self.context_lens[batch:padded].fill_(1)
        self.context_lens[:batch].copy_(inputs.context_lens)
        return key

    def static_inputs(self, key: tuple[int, int]) -> DecodeInputs:
        padded, width = key
        return DecodeInputs(
            self.embeds[:padded],
            self.positions[:padded],
            self.write[:padded],
            self.block_tables[:padded, :width],
            self.context_lens[:padded],
        )

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """Logits [B, V] of one decode step: replays (capturing on first use) the bucket's graph.

        Off CUDA there is nothing to capture: the padded static inputs run eagerly (how the tests drive
        everything but the capture)."""
        key = self.load(inputs)
        if self._pool is None:
            return self.forward(self.static_inputs(key))[: len(inputs.write)]
        if key not in self._graphs:
            self._graphs[key] = self._capture(key)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[: len(inputs.write)]

    def _capture(self, key: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        static = self.static_inputs(key)
        # A warm-up outside the capture initialises kernels and workspaces; it writes the same keys and
        # values that the replay right after writes again.
        side = torch.cuda.Stream(self.embeds.device)
        side.wait_stream(torch.cuda.current_stream(self.embeds.device))
        with torch.cuda.stream(side):
            self.forward(static)
        torch.cuda.current_stream(self.embeds.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(static)
        return graph, logits
