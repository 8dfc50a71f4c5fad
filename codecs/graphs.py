"""Fixed-shape calls of Code2Wav (an ODE solve, a vocoder batch), replayed as CUDA graphs on CUDA.

Off CUDA (or when asked to stay eager) the same padded, static-buffer path runs eagerly, so the bookkeeping
that feeds the graphs (batch padding to a bucket, copies into fixed buffers) is what CPU tests exercise.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket(rows: int) -> int | None:
    """The smallest captured batch size that holds `rows`, or None past the largest."""
    return next((size for size in BATCH_BUCKETS if size >= rows), None)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` [n, ...] with row 0 repeated up to `rows` rows: valid inputs whose outputs are dropped."""
    extra = rows - tensor.shape[0]
    return tensor if extra == 0 else torch.cat([tensor, tensor[:1].expand(extra, *tensor.shape[1:])])


class _Static:
    def __init__(
        self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], capture: bool, pool: object
    ) -> None:
        self.fn = fn
        self.inputs = [t.clone() for t in inputs]
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy inits (cuBLAS handles, autotuning) outside the graph
                fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.output = fn(*self.inputs)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        for buffer, tensor in zip(self.inputs, inputs, strict=True):
            buffer.copy_(tensor)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the graph's output


class StaticCalls:
    """One fixed-buffer call per key (shape): captured on first use when `capture`, run eagerly otherwise."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._calls: dict[Hashable, _Static] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def run(self, key: Hashable, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """fn(*inputs); `fn` must depend on nothing but its inputs' values for a given key."""
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = _Static(fn, inputs, self.capture, self._pool)
        return call(inputs)
