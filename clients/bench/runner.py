"""Runs loads against a server: one run per load and protocol, or a sweep of short runs; never crashes on a request."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import numpy as np

from omnitalk.clients.bench.http_client import HTTPTarget, send_chat
from omnitalk.clients.bench.inputs import BenchInput
from omnitalk.clients.bench.loads import Load, SweepResult, find_max_rate, rate_schedule
from omnitalk.clients.bench.metrics import RequestRecord, summarize
from omnitalk.clients.bench.realtime_client import RealtimeTarget
from omnitalk.clients.bench.sessions import RealtimeSessions, TurnTaking

Sender = Callable[[BenchInput, RequestRecord], Awaitable[None]]
PROTOCOLS = ("http", "realtime")


class Progress(Protocol):
    def start(self, label: str, total: int | None) -> None: ...
    def update(self, record: RequestRecord) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def start(self, label: str, total: int | None) -> None:
        pass

    def update(self, record: RequestRecord) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(slots=True)
class RunResult:
    protocol: str
    load: Load
    records: list[RequestRecord]
    duration: float  # seconds from the run's start to the end of its last request
    started_at: float  # unix time

    def metrics(self, slos: dict[str, float]) -> dict[str, Any]:
        return summarize(self.records, self.duration, slos)


@dataclass(frozen=True, slots=True)
class Sweep:
    """Find the highest Poisson rate at which a run of `duration` seconds meets every SLO."""

    start_rate: float = 1.0
    max_rate: float = 64.0
    max_runs: int = 8
    duration: float = 10.0
    min_requests: int = 4  # each run sends max(min_requests, rate * duration) requests
    attainment: float = 0.9  # a run holds when none failed and this share of its requests met every SLO
    tolerance: float = 0.1


@dataclass(slots=True)
class BenchConfig:
    base_url: str
    model: str
    inputs: list[BenchInput]
    loads: list[Load]  # one run each, per protocol (ignored by a sweep)
    protocols: tuple[str, ...] = ("http",)
    voice: str = "alloy"
    max_tokens: int = 64
    slos: dict[str, float] = field(default_factory=dict)
    sweep: Sweep | None = None
    burstiness: float = 1.0  # of a sweep's runs
    max_concurrency: int | None = None  # of a sweep's runs
    timeout: float = 300.0  # per request
    warmups: int = 0  # requests sent one by one before the runs, per protocol, not recorded
    seed: int = 0
    turn_taking: TurnTaking = field(default_factory=TurnTaking)  # of Realtime sessions


@dataclass(slots=True)
class BenchResult:
    runs: list[RunResult] = field(default_factory=list)
    sweeps: dict[str, SweepResult] = field(default_factory=dict)  # by protocol


async def run_bench(config: BenchConfig, progress: Progress | None = None) -> BenchResult:
    """Every run of `config`, protocol by protocol."""
    progress, result = progress or NoProgress(), BenchResult()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=config.timeout), limits=limits) as http:
        for protocol in config.protocols:
            send = sender(protocol, config, http)
            for i in range(config.warmups):
                item = config.inputs[i % len(config.inputs)]
                await _send_one(send, item, RequestRecord(i, protocol, "warmup"), config.timeout)
            await _close(send)
            if config.sweep is None:
                for load in config.loads:
                    result.runs.append(await run_load(load, config.inputs, send, protocol, config, progress))
            else:
                result.sweeps[protocol] = await _sweep(config, config.sweep, send, protocol, progress, result.runs)
    return result


def sender(protocol: str, config: BenchConfig, http: httpx.AsyncClient) -> Sender:
    if protocol == "http":
        target = HTTPTarget(config.base_url, config.model, config.voice, config.max_tokens, config.timeout)
        return lambda item, record: send_chat(http, target, item, record)
    if protocol == "realtime":
        target = RealtimeTarget(config.base_url, config.model, config.voice, config.max_tokens)
        return RealtimeSessions(target, config.turn_taking)
    raise ValueError(f"unknown protocol {protocol!r}: expected one of {PROTOCOLS}")


async def _sweep(
    config: BenchConfig, sweep: Sweep, send: Sender, protocol: str, progress: Progress, runs: list[RunResult]
) -> SweepResult:
    async def holds(rate: float) -> bool:
        n = max(sweep.min_requests, math.ceil(rate * sweep.duration))
        load = Load("rate", rate=rate, burstiness=config.burstiness, max_concurrency=config.max_concurrency,
                    num_requests=n)  # fmt: skip
        run = await run_load(load, config.inputs, send, protocol, config, progress)
        runs.append(run)
        metrics = run.metrics(config.slos)
        return metrics["failed"] == 0 and (metrics["slo_attainment"] or 0) >= sweep.attainment

    return await find_max_rate(holds, sweep.start_rate, sweep.max_rate, sweep.max_runs, sweep.tolerance)


async def run_load(
    load: Load, inputs: list[BenchInput], send: Sender, protocol: str, config: BenchConfig, progress: Progress
) -> RunResult:
    """Send requests shaped by `load` (inputs taken in turn), wait for all of them, and time the run."""
    records: list[RequestRecord] = []
    in_flight = 0
    start, started_at = time.perf_counter(), time.time()
    deadline = start + load.duration if load.duration is not None else math.inf

    async def one(i: int, rate: float | None, gate: asyncio.Semaphore | None = None) -> None:
        nonlocal in_flight
        in_flight += 1
        item = inputs[i % len(inputs)]
        record = RequestRecord(i, protocol, item.id, time.perf_counter() - start, in_flight, rate)
        records.append(record)
        try:
            await _send_one(send, item, record, config.timeout)
        finally:
            in_flight -= 1
            if gate is not None:
                gate.release()
            progress.update(record)

    if load.kind == "concurrency":
        progress.start(f"{protocol} {load.label}", load.num_requests)
        limit, counter = load.num_requests or math.inf, itertools.count()

        async def worker() -> None:
            while (i := next(counter)) < limit and time.perf_counter() < deadline:
                await one(i, None)

        await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    else:
        schedule = rate_schedule(load, np.random.default_rng(config.seed))
        progress.start(f"{protocol} {load.label}", len(schedule.offsets))
        gate = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
        tasks = []
        for i, (offset, rate) in enumerate(zip(schedule.offsets, schedule.rates, strict=True)):
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            if gate is not None:
                await gate.acquire()
            tasks.append(asyncio.create_task(one(i, rate, gate)))
        await asyncio.gather(*tasks)
    await _close(send)
    progress.close()
    records.sort(key=lambda r: r.index)
    return RunResult(protocol, load, records, time.perf_counter() - start, started_at)


async def _close(send: Sender) -> None:
    """Ends what a sender keeps between requests (Realtime sessions of several turns)."""
    if isinstance(send, RealtimeSessions):
        await send.aclose()


async def _send_one(send: Sender, item: BenchInput, record: RequestRecord, timeout: float) -> None:
    """`send`, with any failure recorded in `record` rather than raised."""
    try:
        async with asyncio.timeout(timeout):
            await send(item, record)
    except Exception as error:
        record.success = False
        record.error = describe(error)


def describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, httpx.ConnectError | OSError) and not str(error):
        return f"cannot connect ({type(error).__name__})"
    return str(error) or type(error).__name__
