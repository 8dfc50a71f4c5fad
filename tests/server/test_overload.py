"""Overload: 4x the stream limit offered at once; the excess is refused with a retry hint, the admitted complete."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest_asyncio
import websockets
from live import MODEL, live_server

from omnitalk.server.settings import ServerSettings

LIMIT = 2
BOUND_S = 300  # a hang guard


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def small(omni, tiny_dir):
    async with live_server(omni, ServerSettings(model=tiny_dir, max_concurrent_streams=LIMIT)) as served:
        yield served


async def one_stream(http: httpx.AsyncClient) -> tuple[int, str | None, list[str]]:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line]
        return response.status_code, response.headers.get("retry-after"), lines


async def test_four_times_the_limit_at_once(small):
    url, state = small
    shed_before = state.metrics.shed._value.get()
    async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
        results = await asyncio.wait_for(asyncio.gather(*(one_stream(http) for _ in range(4 * LIMIT))), BOUND_S)
        metrics = (await http.get("/metrics")).text
    admitted = [lines for status, _, lines in results if status == 200]
    refused = [(retry, lines) for status, retry, lines in results if status == 429]
    assert len(admitted) + len(refused) == 4 * LIMIT
    assert len(admitted) >= LIMIT and refused  # the first LIMIT arrivals always get in
    for lines in admitted:  # every admitted stream ran to its end
        assert lines[-1] == "data: [DONE]"
        finish = json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
        assert finish in ("stop", "length")
    for retry, lines in refused:
        assert retry is not None and int(retry) >= 1
        assert json.loads(lines[0])["error"]["type"] == "rate_limit_error"
    assert state.metrics.shed._value.get() - shed_before == len(refused)
    assert "omnitalk:shed_requests_total" in metrics and "omnitalk:queue_depth" in metrics
    assert state.limiter.active == 0


async def test_a_realtime_response_beyond_the_limit_is_rate_limit_exceeded(small):
    url, state = small
    state.limiter.limit = 0
    try:
        async with websockets.connect(url.replace("http://", "ws://") + f"/v1/realtime?model={MODEL}") as ws:
            await ws.send(json.dumps({"type": "response.create", "event_id": "ev-busy"}))
            while (event := json.loads(await asyncio.wait_for(ws.recv(), BOUND_S)))["type"] != "error":
                pass
            assert event["error"]["code"] == "rate_limit_exceeded" and event["error"]["event_id"] == "ev-busy"
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
            while (event := json.loads(await asyncio.wait_for(ws.recv(), BOUND_S)))["type"] != "session.updated":
                pass  # the session lives on
    finally:
        state.limiter.limit = LIMIT
