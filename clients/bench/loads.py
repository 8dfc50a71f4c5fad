"""Load shapes: fixed concurrency, gamma (Poisson) arrivals at a rate, a linear ramp of rate, and the SLO sweep."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

MAX_ARRIVALS = 100_000  # a rate load bounded only by a duration stops scheduling here


@dataclass(frozen=True, slots=True)
class Load:
    """One run's load. Bounded by `num_requests` (sent), `duration` (seconds: no request is sent after it), or
    both; a ramp needs one of them to know its length."""

    kind: Literal["concurrency", "rate", "ramp"]
    concurrency: int = 1  # kind "concurrency": requests kept in flight
    rate: float = 1.0  # kind "rate": requests/s; kind "ramp": the start rate
    end_rate: float = 1.0  # kind "ramp": the rate at the end of the run
    burstiness: float = 1.0  # gamma shape of the inter-arrival times: 1 is Poisson, < 1 burstier
    max_concurrency: int | None = None  # rate loads: requests in flight at most (later arrivals wait)
    num_requests: int | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        n, duration, cap = self.num_requests, self.duration, self.max_concurrency
        problems = [
            (n is None and duration is None, "a load needs num_requests or duration"),
            ((n is not None and n < 1) or (duration is not None and duration <= 0), "num_requests and duration > 0"),
            (cap is not None and cap < 1, "max_concurrency must be at least 1"),
            (self.kind == "concurrency" and self.concurrency < 1, "concurrency must be at least 1"),
            (self.kind == "rate" and not self.rate > 0, "the request rate must be positive"),
            (self.kind == "ramp" and (min(self.rate, self.end_rate) < 0 or self.rate + self.end_rate <= 0),
             "ramp rates must be >= 0 and not both 0"),
            (not self.burstiness > 0, "burstiness must be positive"),
        ]  # fmt: skip
        for wrong, message in problems:
            if wrong:
                raise ValueError(message)

    @property
    def label(self) -> str:
        if self.kind == "concurrency":
            return f"concurrency {self.concurrency}"
        if self.kind == "rate":
            burst = f", burstiness {self.burstiness:g}" if self.burstiness != 1 else ""
            return f"rate {self.rate:g}/s{burst}"
        return f"ramp {self.rate:g}->{self.end_rate:g}/s over {self.ramp_seconds:.1f} s"

    @property
    def ramp_seconds(self) -> float:
        """A ramp's length: its duration, else the time in which it sends num_requests on average."""
        if self.duration is not None:
            return self.duration
        return 2 * (self.num_requests or 0) / (self.rate + self.end_rate)


@dataclass(frozen=True, slots=True)
class Schedule:
    offsets: list[float]  # send times, seconds from the run's start, increasing
    rates: list[float]  # the offered rate at each send time


def gamma_gaps(rate: float, burstiness: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n inter-arrival times ~ Gamma(shape=b, scale=1/(rate*b)): mean 1/rate, as vllm bench serve."""
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def rate_schedule(load: Load, rng: np.random.Generator) -> Schedule:
    """Send times for a rate or ramp load. The first request goes at 0."""
    if load.kind == "rate":
        n = load.num_requests or MAX_ARRIVALS
        offsets = np.concatenate([[0.0], np.cumsum(gamma_gaps(load.rate, load.burstiness, n - 1, rng))])
        if load.duration is not None:
            offsets = offsets[offsets < load.duration]
        return Schedule(offsets.tolist(), [load.rate] * len(offsets))
    if load.kind == "ramp":
        return ramp_schedule(load, rng)
    raise ValueError(f"a {load.kind} load has no arrival schedule")


def ramp_schedule(load: Load, rng: np.random.Generator) -> Schedule:
    """Arrivals whose rate grows (or falls) linearly from load.rate to load.end_rate over the ramp: unit-mean gamma
    gaps in "operational time" u, mapped back through the inverse of u = Lambda(t) = r0 t + (r1 - r0) t^2 / 2T."""
    r0, r1, span = load.rate, load.end_rate, load.ramp_seconds
    a = (r1 - r0) / (2 * span)
    limit = load.num_requests or MAX_ARRIVALS
    offsets, rates, u = [0.0], [r0], 0.0
    while len(offsets) < limit:
        u += float(gamma_gaps(1.0, load.burstiness, 1, rng)[0])
        t = u / r0 if a == 0 else (-r0 + math.sqrt(max(r0 * r0 + 4 * a * u, 0.0))) / (2 * a)
        if t >= span or r0 * r0 + 4 * a * u < 0:
            break
        offsets.append(t)
        rates.append(ramp_rate(load, t))
    return Schedule(offsets, rates)


def ramp_rate(load: Load, t: float) -> float:
    return load.rate + (load.end_rate - load.rate) * min(max(t / load.ramp_seconds, 0.0), 1.0)


@dataclass(slots=True)
class SweepResult:
    best_rate: float | None  # the highest rate tried at which the SLOs held
    tried: list[tuple[float, bool]] = field(default_factory=list)  # (rate, SLOs held), in the order run


async def find_max_rate(
    holds: Callable[[float], Awaitable[bool]],
    start: float,
    max_rate: float,
    max_runs: int,
    tolerance: float = 0.1,
) -> SweepResult:
    """The highest request rate at which `holds(rate)` (a short run meets every SLO): double from `start` until a
    run fails or `max_rate` is reached, then bisect between the best passing and the lowest failing rate until
    they are within `tolerance` (relative) or `max_runs` runs are spent."""
    result = SweepResult(None)
    passing, failing = 0.0, math.inf
    rate = min(start, max_rate)
    for _ in range(max_runs):
        ok = await holds(rate)
        result.tried.append((rate, ok))
        if ok:
            passing = rate
        else:
            failing = rate
        if math.isinf(failing):
            if rate >= max_rate:
                break
            rate = min(rate * 2, max_rate)
        else:
            if failing - passing <= tolerance * failing:
                break
            rate = (passing + failing) / 2
    result.best_rate = passing or None
    return result
