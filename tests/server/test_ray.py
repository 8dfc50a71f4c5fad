"""`omnitalk serve --ray` on a local Ray cluster: two replicas of the tiny model behind Ray Serve's proxy.

The replicas are what `serve_on_ray` deploys (`build_app`); each is the whole engine and app. A replica takes at
most STREAMS requests (`max_ongoing_requests`), and a Realtime session is one request for its life.

Two sets share one cluster, started once for the module: ~4 min of start-up on the shared 2-core machine, and
~9.4 GiB (PSS: per replica ~4.4 GiB, Ray ~0.6 GiB) beside the test session's own engine (~6.6 GiB) while both
replicas run.
- CI's (`make test`, every run, ~6 min in all): the first two sessions land on different replicas (Ray's router
  picks the less loaded) and each serves a Realtime turn; with every replica at its limit a new session waits in
  Ray's queue and lands on the replica that frees a slot; a streamed chat; and last, one replica's vLLM engine is
  killed: its streams end `failed`, the other replica's run to their end, new sessions go to the healthy replica,
  and Ray brings up a new one (~2 min).
- The full set adds, with OMNITALK_RAY_CLUSTER=1 (~35 s more): one scrape of Ray's metrics export shows every
  replica's live streams, and `omnitalk bench` (both protocols) runs against the proxy.
The tests run in file order: the routing tests need an idle cluster, the failover test ends it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import websockets

from omnitalk.server.scaleout import APP_NAME, REPLICA_HEADER, RayOptions, build_app, deployment_options, replica_gpus
from omnitalk.server.settings import ServerSettings

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")

MODEL = "omnitalk-tiny-random"
STREAMS = 2  # each replica's stream limit, so its Ray request limit
KILLED_RESPONSE_TOKENS = 600
HELLO = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a long story."}]}
# Each replica's memory, so that two fit beside the test session's own engine: vLLM's CPU KV cache in GiB (the
# session's share of RAM would give each ~2.4 GiB, zeroed at start-up; the tiny model needs a few MiB), a small
# talker pool, and no torch.compile (the replicas test routing and failover; the session's engine, compiled, tests
# the model). VLLM_CPU_KVCACHE_SPACE is vLLM's own CPU knob: the replicas inherit it from Ray's runtime_env.
REPLICA_KV_GIB = "1"
REPLICA = {"max_concurrent_streams": STREAMS, "talker_memory_gib": 0.125, "enforce_eager": True}
full_set = pytest.mark.skipif(
    os.environ.get("OMNITALK_RAY_CLUSTER") != "1", reason="in the full Ray set only: run with OMNITALK_RAY_CLUSTER=1"
)


@dataclass(frozen=True, slots=True)
class Cluster:
    url: str  # Ray Serve's proxy
    metrics_url: str  # Ray's Prometheus export


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(settings: ServerSettings) -> Iterator[Cluster]:
    from ray import serve

    http_port, metrics_port = _free_port(), _free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        _metrics_export_port=metrics_port,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": REPLICA_KV_GIB}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    replica = settings.model_copy(update=REPLICA)
    serve.run(build_app(replica, MODEL, RayOptions(None, 0, 2, 2), 0), name=APP_NAME, route_prefix="/")
    yield Cluster(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics")
    serve.shutdown()
    ray.shutdown()


class Session:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.replica: str = ws.response.headers[REPLICA_HEADER]

    async def send(self, kind: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": kind, **fields}))

    async def until(self, *kinds: str) -> dict[str, Any]:
        while True:
            event = json.loads(await asyncio.wait_for(self.ws.recv(), 300))
            if event["type"] in kinds:
                return event


async def open_session(url: str, stack: AsyncExitStack) -> Session:
    """A Realtime session past session.created, closed with `stack`."""
    ws = await stack.enter_async_context(
        # No handshake timeout: while every replica is full, Ray holds the session until one has room.
        websockets.connect(url.replace("http://", "ws://") + f"/v1/realtime?model={MODEL}", open_timeout=None)
    )
    session = Session(ws)
    assert (await session.until("session.created", "error"))["type"] == "session.created"
    return session


@asynccontextmanager
async def sessions(url: str, n: int) -> AsyncIterator[list[Session]]:
    """`n` Realtime sessions open at once, opened one after another."""
    async with AsyncExitStack() as stack:
        yield [await open_session(url, stack) for _ in range(n)]


async def start_text_response(session: Session, max_tokens: int | str) -> None:
    await session.send("conversation.item.create", item=HELLO)
    response = {"output_modalities": ["text"], "max_output_tokens": max_tokens}
    await session.send("response.create", response=response)


async def realtime_turn(session: Session) -> None:
    """A turn with the session's default output (audio and its transcript)."""
    await session.send("conversation.item.create", item=HELLO)
    await session.send("response.create", response={"max_output_tokens": 8})
    audio = await session.until("response.output_audio.delta", "response.done")
    assert audio["type"] == "response.output_audio.delta" and audio["delta"]
    done = (await session.until("response.done"))["response"]
    # The random model never says eos: it stops at max_output_tokens, which OpenAI calls incomplete.
    assert done["status"] == "incomplete" and done["status_details"]["reason"] == "max_output_tokens"


def test_a_replica_reserves_its_thinker_and_speech_gpus(settings: ServerSettings) -> None:
    tp2 = settings.model_copy(update={"tensor_parallel_size": 2})
    assert replica_gpus(tp2, cluster_gpus=8) == 2  # speech on the thinker's first GPU
    assert replica_gpus(tp2.model_copy(update={"speech_device": "cuda:2"}), cluster_gpus=8) == 3
    assert replica_gpus(tp2, cluster_gpus=0) == 0


def test_autoscaling_only_when_the_replica_count_may_change(settings: ServerSettings) -> None:
    fixed = deployment_options(settings, RayOptions(None, None, 2, 2), 1)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == settings.max_concurrent_streams
    scaling = deployment_options(settings, RayOptions(None, None, 1, 4), 0.5)["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 4)
    assert 1 <= scaling["target_ongoing_requests"] < settings.max_concurrent_streams


async def test_a_new_session_goes_to_the_less_loaded_replica(cluster: Cluster) -> None:
    """First on the idle cluster: the second session finds one replica holding a request and the other none."""
    async with sessions(cluster.url, 2) as held:
        assert held[0].replica != held[1].replica
        for session in held:  # a Realtime turn on each replica
            await realtime_turn(session)


async def test_a_full_replica_is_not_chosen(cluster: Cluster) -> None:
    """With both replicas at their limit a new session waits in Ray's queue, then lands where a slot frees."""
    async with AsyncExitStack() as stack, httpx.AsyncClient() as client:
        held = [await open_session(cluster.url, stack) for _ in range(2 * STREAMS)]
        replicas = [s.replica for s in held]
        assert sorted(replicas.count(r) for r in set(replicas)) == [STREAMS, STREAMS]
        late = asyncio.ensure_future(open_session(cluster.url, stack))
        await _metric(client, cluster.metrics_url, "ray_serve_deployment_queued_queries", lambda v: sum(v) == 1)
        assert not late.done()
        freed = held.pop()
        await freed.ws.close()
        assert (await late).replica == freed.replica


async def test_streamed_chat_through_ray(cluster: Cluster) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
    async with (
        httpx.AsyncClient(timeout=300) as client,
        client.stream("POST", cluster.url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200 and response.headers[REPLICA_HEADER]
        frames = [line.removeprefix("data: ") async for line in response.aiter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert all("error" not in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@full_set
async def test_one_scrape_gives_every_replicas_live_streams(cluster: Cluster) -> None:
    async with sessions(cluster.url, STREAMS + 1) as held, httpx.AsyncClient() as client:
        for session in held:
            await start_text_response(session, "inf")
        for session in held:
            await session.until("response.output_text.delta")
        live = await _live_streams(client, cluster.metrics_url, lambda live: sum(live.values()) == len(held))
        assert set(live) == {s.replica for s in held}
        for session in held:
            await session.send("response.cancel")
            assert (await session.until("response.done"))["response"]["status"] == "cancelled"
        await _live_streams(client, cluster.metrics_url, lambda live: sum(live.values()) == 0)


async def _live_streams(
    client: httpx.AsyncClient, url: str, wanted: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    """`ray_omnitalk_live_streams` by replica, once `wanted` holds."""
    return await _metric(client, url, "ray_omnitalk_live_streams", wanted, by="replica")


async def _metric(client: httpx.AsyncClient, url: str, name: str, wanted: Callable, by: str | None = None) -> Any:
    """A metric of Ray's export, once `wanted` holds (Ray exports every few seconds): its values by tag `by`, or
    without `by` the list of its series' values."""
    while True:
        lines = [line for line in (await client.get(url)).text.splitlines() if line.startswith(name + "{")]
        values = [float(line.rsplit(" ", 1)[1]) for line in lines]
        tags = [line.split(f'{by}="')[1].split('"')[0] for line in lines] if by else []
        series = dict(zip(tags, values, strict=True)) if by else values
        if series and wanted(series):
            return series
        await asyncio.sleep(1)


@full_set
def test_omnitalk_bench_against_ray(cluster: Cluster, tmp_path: Path) -> None:
    result = tmp_path / "bench.json"
    load = ["--protocol", "both", "--concurrency", "3", "--num-requests", "3", "--max-tokens", "8", "--warmups", "0"]
    args = ["--url", cluster.url, *load, "--no-plots", "--no-progress", "--result-json", str(result)]
    subprocess.run([Path(sys.executable).parent / "omnitalk", "bench", *args], check=True, timeout=900)
    runs = json.loads(result.read_text())["runs"]
    assert {run["protocol"] for run in runs} == {"http", "realtime"}
    assert all(run["metrics"]["completed"] == 3 and run["metrics"]["failed"] == 0 for run in runs)


async def test_a_dead_engine_fails_its_streams_and_its_replica_comes_back(cluster: Cluster) -> None:
    async with sessions(cluster.url, STREAMS + 1) as held:
        before = {s.replica for s in held}
        for session in held:  # long enough to be live when the engine dies; the other replica's run to their end
            await start_text_response(session, KILLED_RESPONSE_TOKENS)
        for session in held:
            await session.until("response.output_text.delta")
        _kill_one_engine()
        statuses = await asyncio.gather(*(_response_end(s) for s in held))
    ends: dict[str, set[str]] = {}
    for session, status in zip(held, statuses, strict=True):
        ends.setdefault(session.replica, set()).add(status)
    assert sorted(tuple(statuses) for statuses in ends.values()) == [("failed",), ("incomplete",)]
    dead = next(r for r, statuses in ends.items() if statuses == {"failed"})
    while True:  # Ray replaces the replica whose health check fails; meanwhile the other one serves
        try:
            async with sessions(cluster.url, STREAMS + 1) as held:
                now = {s.replica for s in held}
        except websockets.ConnectionClosed:  # accepted by the dead replica just before Ray stopped it
            continue
        if len(now) == 2 and dead not in now:
            break
        await asyncio.sleep(1)
    assert now - before  # a new replica, and the healthy one still serving
    assert (before - {dead}) <= now


async def _response_end(session: Session) -> str:
    """The status its response ends with; a failed one's session is closed at once, so that Ray stops the dead
    replica without waiting out its graceful shutdown for the session (the replacement's start overlaps less)."""
    status = (await session.until("response.done"))["response"]["status"]
    if status == "failed":
        await session.ws.close()
    return status


def _kill_one_engine() -> None:
    """SIGKILL one replica's vLLM EngineCore process (the test session's own engine, if started, is not one)."""
    replicas = [p for p in psutil.Process(os.getpid()).children(recursive=True) if "ServeReplica" in _title(p)]
    cores = [c for r in replicas for c in r.children(recursive=True) if "EngineCore" in _title(c)]
    assert len(replicas) == len(cores) == 2, [_title(p) for p in replicas + cores]
    cores[0].kill()


def _title(process: psutil.Process) -> str:
    """The process title (vLLM sets it in argv; `name()` is cut at 15 characters)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile
        return ""
