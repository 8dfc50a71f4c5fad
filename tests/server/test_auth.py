"""API keys on every /v1 route and the WebSocket (both key forms), the Origin allow-list, no cross-site POSTs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import websockets
from live import MODEL, live_server

from omnitalk.server.settings import ServerSettings

KEYS = ("sk-first-key", "sk-second-key")
BOUND_S = 120  # a hang guard
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keyed(omni, tiny_dir, tmp_path_factory) -> AsyncIterator[tuple[str, object]]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# a comment\n{KEYS[1]}\n")
    settings = ServerSettings(model=tiny_dir, max_concurrent_streams=4, api_key=[KEYS[0]], api_key_file=key_file,
                              allowed_origins=["https://app.example"])  # fmt: skip
    async with live_server(omni, settings) as served:
        yield served


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"authorization": f"Bearer {key}"}


async def call(url: str, route: str, key: str | None, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
        if route == "/v1/models":
            return await http.get(route, headers={**bearer(key), **headers})
        headers = {"content-type": "application/json", **bearer(key), **headers}
        return await http.post(route, content=json.dumps(HELLO), headers=headers)


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + f"/v1/realtime?model={MODEL}"


@pytest.mark.parametrize("route", ["/v1/models", "/v1/chat/completions"])
@pytest.mark.parametrize("key", [None, "sk-wrong", KEYS[0] + "x", KEYS[0][:-1]])
async def test_http_routes_refuse_missing_or_wrong_keys(keyed, route, key):
    url, state = keyed
    response = await call(url, route, key)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert state.limiter.active == 0 and "sk-" not in response.text  # no key is echoed


@pytest.mark.parametrize("route", ["/v1/models", "/v1/chat/completions"])
@pytest.mark.parametrize("key", KEYS)
async def test_http_routes_take_every_configured_key(keyed, route, key):
    url, _ = keyed
    response = await call(url, route, key)
    assert response.status_code == 200, response.text


async def test_health_ready_and_metrics_stay_open(keyed):
    url, _ = keyed
    async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
        for route in ("/health", "/ready", "/metrics"):
            assert (await http.get(route)).status_code == 200, route


async def test_a_flag_guards_metrics(omni, tiny_dir):
    settings = ServerSettings(model=tiny_dir, api_key=[KEYS[0]], api_key_guards_metrics=True)
    async with live_server(omni, settings) as (url, _), httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=bearer(KEYS[0]))).status_code == 200
        assert (await http.get("/health")).status_code == 200


@pytest.mark.parametrize("form", ["header", "subprotocol"])
@pytest.mark.parametrize("key", KEYS)
async def test_the_websocket_takes_a_key_in_either_form(keyed, form, key):
    url, _ = keyed
    kwargs = {"additional_headers": bearer(key)} if form == "header" else {
        "subprotocols": ["realtime", f"openai-insecure-api-key.{key}"]}  # fmt: skip
    async with websockets.connect(ws_url(url), open_timeout=BOUND_S, **kwargs) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        if form == "subprotocol":
            assert ws.subprotocol == "realtime"  # the key is never echoed back


@pytest.mark.parametrize("form", ["none", "header", "subprotocol"])
async def test_the_websocket_refuses_missing_or_wrong_keys_before_the_upgrade(keyed, form):
    url, _ = keyed
    kwargs = {
        "none": {},
        "header": {"additional_headers": bearer("sk-wrong")},
        "subprotocol": {"subprotocols": ["realtime", "openai-insecure-api-key.sk-wrong"]},
    }[form]
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url(url), open_timeout=BOUND_S, **kwargs):
            pass
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [("https://app.example", True), ("https://evil.example", False), ("null", False), ("self", True)],
)
async def test_websocket_origins_are_checked_against_the_allow_list(keyed, origin, allowed):
    url, _ = keyed
    origin = url if origin == "self" else origin  # the server's own page (the demo)
    connecting = websockets.connect(ws_url(url), open_timeout=BOUND_S, origin=origin,
                                    additional_headers=bearer(KEYS[0]))  # fmt: skip
    if allowed:
        async with connecting as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        return
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connecting:
            pass
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("mime", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"])
async def test_cross_site_simple_posts_run_no_inference(keyed, mime):
    url, state = keyed
    before = state.metrics.requests.labels("ok")._value.get()
    response = await call(url, "/v1/chat/completions", KEYS[0], **{"content-type": mime})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = await call(url, "/v1/chat/completions", KEYS[0], origin="https://evil.example")
    assert response.status_code == 403
    assert state.metrics.requests.labels("ok")._value.get() == before
