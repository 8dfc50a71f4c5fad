"""Load shapes: gamma arrivals keep their mean rate, a ramp rises, the sweep finds the edge, runs survive failures."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from omnitalk.clients.bench.inputs import BenchInput
from omnitalk.clients.bench.loads import Load, find_max_rate, gamma_gaps, ramp_rate, rate_schedule
from omnitalk.clients.bench.runner import BenchConfig, NoProgress, run_load


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_gamma_arrivals_keep_the_mean_rate(burstiness):
    gaps = gamma_gaps(rate=5.0, burstiness=burstiness, n=200_000, rng=np.random.default_rng(1))
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.02)
    # The coefficient of variation of Gamma(b) gaps is 1/sqrt(b): b < 1 burstier, b = 1 Poisson, b > 1 smoother.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.03)


def test_rate_schedule_counts_and_duration():
    rng = np.random.default_rng(2)
    schedule = rate_schedule(Load("rate", rate=4.0, num_requests=50), rng)
    assert len(schedule.offsets) == 50 and schedule.offsets[0] == 0.0
    assert np.all(np.diff(schedule.offsets) > 0) and set(schedule.rates) == {4.0}
    timed = rate_schedule(Load("rate", rate=20.0, duration=100.0), rng)
    assert max(timed.offsets) < 100.0
    assert len(timed.offsets) == pytest.approx(2000, rel=0.05)


@pytest.mark.parametrize(("start", "end"), [(1.0, 9.0), (0.0, 10.0), (8.0, 2.0)])
def test_ramp_follows_its_rate(start, end):
    load = Load("ramp", rate=start, end_rate=end, duration=400.0)
    schedule = rate_schedule(load, np.random.default_rng(3))
    offsets = np.asarray(schedule.offsets)
    assert np.all(np.diff(offsets) > 0) and offsets[-1] < 400.0
    rates = np.diff(schedule.rates)
    assert np.all(rates >= 0) if end > start else np.all(rates <= 0)  # the offered rate is monotone
    assert len(offsets) == pytest.approx(400.0 * (start + end) / 2, rel=0.05)  # the area under the ramp
    counts = np.histogram(offsets, bins=4, range=(0, 400))[0]  # each quarter gets its share of the ramp
    expected = [100 * (ramp_rate(load, 100 * q) + ramp_rate(load, 100 * (q + 1))) / 2 for q in range(4)]
    assert counts == pytest.approx(expected, rel=0.1)


def test_ramp_length_from_its_request_count():
    load = Load("ramp", rate=1.0, end_rate=3.0, num_requests=40)
    assert load.ramp_seconds == pytest.approx(20.0)
    assert len(rate_schedule(load, np.random.default_rng(4)).offsets) <= 40


def test_loads_refuse_nonsense():
    for kwargs in ({"kind": "rate", "rate": 0}, {"kind": "concurrency", "concurrency": 0}):
        with pytest.raises(ValueError):
            Load(num_requests=1, **kwargs)
    with pytest.raises(ValueError, match="num_requests or duration"):
        Load("rate", rate=1.0)


async def test_sweep_doubles_then_bisects_to_the_edge():
    tried = []

    async def holds(rate: float) -> bool:  # a server whose SLOs hold up to 5.5 requests/s
        tried.append(rate)
        return rate <= 5.5

    result = await find_max_rate(holds, start=1.0, max_rate=64.0, max_runs=20, tolerance=0.05)
    assert tried[:4] == [1.0, 2.0, 4.0, 8.0]  # doubling until the first failure
    assert 5.0 <= result.best_rate <= 5.5
    assert all(ok == (rate <= 5.5) for rate, ok in result.tried)


async def test_sweep_is_bounded_by_runs_and_max_rate():
    async def always(rate: float) -> bool:
        return True

    async def never(rate: float) -> bool:
        return False

    assert (await find_max_rate(always, 1.0, 10.0, 20)).best_rate == 10.0
    assert len((await find_max_rate(always, 1.0, 1e9, 3)).tried) == 3
    none = await find_max_rate(never, 1.0, 64.0, 4)
    assert none.best_rate is None and [r for r, _ in none.tried] == [1.0, 0.5, 0.25, 0.125]


def config(inputs: list[BenchInput]) -> BenchConfig:
    return BenchConfig("http://unused", "m", inputs, [], timeout=5.0)


async def test_fixed_concurrency_keeps_n_in_flight_and_survives_failures():
    inputs = [BenchInput("a", "x"), BenchInput("b", "y")]
    live, peak = 0, 0

    async def send(item, record):
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await asyncio.sleep(0.01)
        live -= 1
        if record.index % 3 == 0:
            raise RuntimeError("boom")
        record.success = True

    run = await run_load(Load("concurrency", concurrency=3, num_requests=12), inputs, send, "http", config(inputs),
                         NoProgress())  # fmt: skip
    assert [r.index for r in run.records] == list(range(12))
    assert [r.input_id for r in run.records[:3]] == ["a", "b", "a"]
    assert peak == 3 and max(r.concurrency for r in run.records) == 3
    failed = [r for r in run.records if not r.success]
    assert len(failed) == 4 and {r.error for r in failed} == {"boom"}
    assert run.metrics({})["failed"] == 4


async def test_rate_load_respects_max_concurrency_and_times_out():
    inputs = [BenchInput("a", "x")]

    async def send(item, record):
        await asyncio.sleep(10 if record.index == 0 else 0.05)
        record.success = True

    cfg = config(inputs)
    cfg.timeout = 0.3
    load = Load("rate", rate=200.0, num_requests=10, max_concurrency=2)
    run = await run_load(load, inputs, send, "http", cfg, NoProgress())
    assert max(r.concurrency for r in run.records) == 2
    assert run.records[0].error == "timed out" and all(r.success for r in run.records[1:])
    assert all(r.offered_rate == 200.0 for r in run.records)
