"""Code2Wav's flow ODE on a fixed time grid: RK4 (transformers') or Euler, and what each costs in DiT calls."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from omnitalk.codecs.streaming import SOLVERS


def dit_calls(solver: str, num_steps: int) -> int:
    """DiT evaluations of one solve over `num_steps` time points: 4 per interval with RK4, 1 with Euler."""
    return (num_steps - 1) * (4 if solver == "rk4" else 1)


def stage_times(times: torch.Tensor, solver: str) -> torch.Tensor:
    """The times [S] at which `integrate` evaluates f, in its order of evaluation."""
    if solver not in SOLVERS or len(times) < 2:
        raise ValueError(f"need a solver in {SOLVERS} and at least 2 time points, got {solver!r}, {len(times)}")
    if solver == "euler":
        return times[:-1]
    stages = [(t0, t0 + (t1 - t0) * (1 / 3), t0 + (t1 - t0) * (2 / 3), t1) for t0, t1 in itertools.pairwise(times)]
    return torch.stack([t for stage in stages for t in stage])


def integrate(
    f: Callable[[int, torch.Tensor], torch.Tensor], x: torch.Tensor, times: torch.Tensor, solver: str
) -> torch.Tensor:
    """x at times[-1]: fixed-grid Euler, or RK4 with the 3/8 rule (torchdiffeq's "rk4", transformers' solver).

    f(k, y) is the velocity at y and the k-th of `stage_times(times, solver)`.
    """
    stage_times(times, solver)  # checks the solver and the grid
    k = 0
    for t0, t1 in itertools.pairwise(times):
        dt = t1 - t0
        if solver == "euler":
            x, k = x + dt * f(k, x), k + 1
            continue
        k1 = f(k, x)
        k2 = f(k + 1, x + dt * k1 * (1 / 3))
        k3 = f(k + 2, x + dt * (k2 - k1 * (1 / 3)))
        k4 = f(k + 3, x + dt * (k1 - k2 + k3))
        x, k = x + (k1 + 3 * (k2 + k3) + k4) * dt / 8, k + 4
    return x
