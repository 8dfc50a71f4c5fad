"""Leaks: 200 streams aborted at random points over both protocols. Afterwards live streams, stream-limit slots,
thinker requests, talker slots and Code2Wav streams are back to zero, thread and task counts back to their
baseline, and this process's memory within MEMORY_BOUND of its baseline."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx
import psutil
import pytest_asyncio
import websockets
from live import MODEL, live_server, settled

from omnitalk.server.settings import ServerSettings

NUM_HTTP, NUM_REALTIME = 140, 60
CONCURRENCY = 4
MEMORY_BOUND = 300 * 1024 * 1024  # RSS growth allowed over 200 aborted streams (allocator caches included)
BOUND_S = 120  # a hang guard
SPEAK = {"modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "pcm16"}}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def leaky(omni, tiny_dir):
    async with live_server(omni, ServerSettings(model=tiny_dir, max_concurrent_streams=8)) as served:
        yield served


async def abort_http(url: str, rng: random.Random) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    if rng.random() < 0.6:
        body |= SPEAK
    lines = rng.randrange(0, 8)
    http = httpx.AsyncClient(base_url=url, timeout=BOUND_S)
    async with http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for _ in response.aiter_lines():
            lines -= 1
            if lines < 0:
                break  # leaving the block closes the connection mid-stream


async def abort_realtime(url: str, rng: random.Random) -> None:
    events = rng.randrange(0, 12)
    async with websockets.connect(url.replace("http://", "ws://") + f"/v1/realtime?model={MODEL}") as ws:
        await ws.recv()
        modalities = ["audio"] if rng.random() < 0.6 else ["text"]
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                  "content": [{"type": "input_text", "text": "hi"}]}}))  # fmt: skip
        response = {"max_output_tokens": 200, "output_modalities": modalities}
        await ws.send(json.dumps({"type": "response.create", "response": response}))
        for _ in range(events):
            if json.loads(await asyncio.wait_for(ws.recv(), BOUND_S))["type"] == "response.done":
                break


async def abort_many(url: str, rng: random.Random, num_http: int, num_realtime: int) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)
    kinds = [abort_http] * num_http + [abort_realtime] * num_realtime
    rng.shuffle(kinds)

    async def one(kind) -> None:
        async with gate:
            await asyncio.wait_for(kind(url, rng), BOUND_S)

    await asyncio.gather(*(one(kind) for kind in kinds))


def own_threads() -> int:
    """Threads other than the default executor's workers (asyncio.to_thread), which are bounded and reused."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("asyncio_"))


async def test_two_hundred_aborted_streams_leave_nothing_behind(leaky):
    url, state = leaky
    rng = random.Random(7)
    process = psutil.Process()
    await abort_many(url, rng, 6, 2)  # warm-up: worker threads and caches exist before the baseline
    assert await settled(state)
    threads, tasks, memory = own_threads(), len(asyncio.all_tasks()), process.memory_info().rss
    await abort_many(url, rng, NUM_HTTP, NUM_REALTIME)
    assert await settled(state)
    for _ in range(100):  # connection tasks end a little after their sockets
        if len(asyncio.all_tasks()) <= tasks:
            break
        await asyncio.sleep(0.05)
    assert len(asyncio.all_tasks()) <= tasks
    assert own_threads() <= threads
    pool = asyncio.get_running_loop()._default_executor  # to_thread's workers: created lazily, bounded, idle after
    assert pool is None or len(pool._threads) <= pool._max_workers
    assert process.memory_info().rss - memory < MEMORY_BOUND
    assert state.engine.speech.failure is None and state.engine.thinker.failure is None
