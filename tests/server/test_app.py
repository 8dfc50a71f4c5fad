"""The app's own routes on the real server: health, readiness, models, metrics, and errors in OpenAI's shape."""

from __future__ import annotations

import httpx


async def test_health_ready_models_and_metrics(server):
    url, _ = server
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/ready")).json() == {"status": "ready"}
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == "omnitalk-tiny-random"
        metrics = (await client.get("/metrics")).text
        assert "omnitalk:audio_ttfp_s_bucket" in metrics and "omnitalk:live_streams" in metrics


async def test_unknown_route_is_an_openai_error(server):
    url, _ = server
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
