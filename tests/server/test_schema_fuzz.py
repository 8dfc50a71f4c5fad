"""schemathesis over the server's published OpenAPI schema for POST /v1/chat/completions: a bounded number of
generated requests, each answered in bounded time, none with a 5xx, every answer in its declared shape."""

from __future__ import annotations

import asyncio
import json

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

EXAMPLES = 120
BOUND_S = 60  # each request's hang guard
MAX_TOKENS = 8  # generated requests are kept short: the fuzzing is in their shape, not their length
STATUSES = {200, 400, 413, 415, 429}


def bounded(body: object) -> object:
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if body.get("max_tokens") is None:  # absent or null: the default (1024) would make a long answer
            body["max_tokens"] = MAX_TOKENS
    return body


def check(response: httpx.Response) -> None:
    assert response.status_code in STATUSES, (response.status_code, response.text[:500])
    kind = response.headers.get("content-type", "")
    if response.status_code == 200 and kind.startswith("text/event-stream"):
        frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f]
        assert frames[-1] == "[DONE]"
        for frame in frames[:-1]:
            chunk = json.loads(frame)
            assert chunk.get("object") == "chat.completion.chunk" or set(chunk) == {"error"}, chunk
        return
    assert kind.startswith("application/json")
    body = response.json()
    if response.status_code == 200:
        assert body["object"] == "chat.completion" and len(body["choices"]) == 1 and "usage" in body
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_generated_requests_never_get_a_5xx_or_hang(server):
    url, _ = server
    async with httpx.AsyncClient(base_url=url) as http:
        schema = schemathesis.openapi.from_dict((await http.get("/openapi.json")).json())
    operation = schema["/v1/chat/completions"]["POST"]
    seen: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(operation.as_strategy())
    def run(case) -> None:
        body = json.dumps(bounded(case.body)).encode()
        with httpx.Client(base_url=url, timeout=BOUND_S) as http:
            try:
                response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            except httpx.TimeoutException as error:
                raise AssertionError(f"no answer within {BOUND_S} s to {body[:2000]!r}") from error
        check(response)
        seen.append(response.status_code)

    await asyncio.to_thread(run)  # the server runs on this event loop
    assert len(seen) >= EXAMPLES // 2 and 200 in seen and 400 in seen  # the published example is valid
