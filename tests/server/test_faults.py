"""Fault injection: a stage that fails ends the requests it held with an error, frees their slots, and the server
recovers in-process (speech thread, row receiver, a tap failure) or says why on /health and exits non-zero
(a dead EngineCore, a failed start). Nothing here breaks the session's shared engine: the EngineCore is killed
in a server of its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import zmq
import zmq.asyncio

from omnitalk.engine.failure import EngineFailure
from omnitalk.engine.request import Message, Sampling, Text, ThinkerRequest
from omnitalk.engine.thinker import rows as wire
from omnitalk.engine.thinker.engine import ThinkerEngine

BOUND_S = 120  # a hang guard: an error that never comes fails the test
SPOKEN = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True,
          "modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "pcm16"}}  # fmt: skip
OMNITALK = str(Path(sys.executable).parent / "omnitalk")


async def stream_until_error(url: str, body: dict, during=None) -> dict:
    """Streams `body`; once audio (or text) flows, runs `during()`; returns the error frame that ends the stream."""
    http = httpx.AsyncClient(base_url=url, timeout=BOUND_S)
    async with http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        injected = False
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                return chunk["error"]
            if not injected and during is not None and chunk["choices"] and chunk["choices"][0]["delta"]:
                injected = True
                during()
    raise AssertionError("the stream ended without an error")


async def idle(state) -> None:
    for _ in range(400):
        engine = state.engine
        if state.limiter.active == 0 and engine.speech.num_streams == 0 and engine.thinker.num_open_streams == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("slots still held")


async def served_after(url: str) -> None:
    body = {**SPOKEN, "max_tokens": 4, "stream": False}
    async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert (await http.get("/health")).json() == {"status": "ok"}


async def test_a_raise_inside_the_speech_thread_fails_its_streams_and_the_thread_goes_on(server, monkeypatch):
    url, state = server
    speech = state.engine.speech
    failures = speech.num_failures
    original = speech.code2wav.ready

    def once(stream):  # outside any per-stream guard: the thread's own loop
        monkeypatch.setattr(speech.code2wav, "ready", original)
        raise RuntimeError("injected fault in the speech thread")

    error = await asyncio.wait_for(
        stream_until_error(url, SPOKEN, lambda: monkeypatch.setattr(speech.code2wav, "ready", once)), BOUND_S
    )
    assert error["type"] == "server_error" and error["code"] == "engine_failure"
    assert "speech stage failed" in error["message"] and "injected" not in error["message"]
    await idle(state)
    assert speech.num_failures == failures + 1
    assert speech.talker.num_free_slots == speech.max_batch
    await served_after(url)


async def test_dropping_the_row_receiver_fails_the_streams_waiting_for_rows(server):
    url, state = server
    thinker = state.engine.thinker
    failures = thinker.num_receiver_failures
    error = await asyncio.wait_for(stream_until_error(url, SPOKEN, lambda: thinker._receiver.cancel()), BOUND_S)
    assert error["code"] == "engine_failure" and "hidden-state receiver" in error["message"]
    await idle(state)
    assert thinker.num_receiver_failures == failures + 1
    await served_after(url)  # the next request that wants rows starts a new receiver


async def test_a_tap_failure_fails_only_the_streams_it_names(thinker: ThinkerEngine):
    """What the worker sends when publishing fails (tap.py): the named stream fails, the engine serves on."""
    push = zmq.asyncio.Context.instance().socket(zmq.PUSH)
    push.connect(thinker._address)
    messages = (Message("user", (Text("hi"),)),)
    try:
        request = ThinkerRequest("tap-fault", messages, Sampling(max_tokens=400), hidden_states=True)
        with pytest.raises(EngineFailure, match="could not publish"):
            async with asyncio.timeout(BOUND_S):
                async for _ in thinker.generate(request):
                    await push.send_multipart(wire.encode_failure(["tap-fault"]))
    finally:
        push.close(linger=0)
    survivor = ThinkerRequest("after-tap-fault", messages, Sampling(max_tokens=2), hidden_states=True)
    assert [e async for e in thinker.generate(survivor)]
    assert thinker.failure is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_start_up_failure_exits_non_zero_with_one_line(tmp_path):
    env = {**os.environ, "OMNITALK_FAILURE_GRACE_S": "0"}
    done = subprocess.run([OMNITALK, "serve", "--model", str(tmp_path / "missing"), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=BOUND_S * 3, env=env)  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("omnitalk serve: error:") and "no config.json" in last, done.stderr[-2000:]


def engine_core(pid: int) -> psutil.Process:
    children = psutil.Process(pid).children(recursive=True)
    named = [p for p in children if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    others = [p for p in children if "resource_tracker" not in " ".join(p.cmdline())]
    assert named or others, "no EngineCore process found"
    return (named or others)[0]


async def test_killing_the_engine_core_fails_the_stream_marks_unhealthy_and_exits(tiny_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMNITALK_FAILURE_GRACE_S": "5", "OMNITALK_GPU_MEMORY_UTILIZATION": "0.1",
           "OMNITALK_MAX_MODEL_LEN": "2048", "OMNITALK_MAX_NUM_SEQS": "2"}  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([OMNITALK, "serve", "--model", str(tiny_dir), "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
            for _ in range(1200):  # up to 10 minutes to load under a busy machine
                try:
                    if (await http.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                await asyncio.sleep(0.5)
            core = engine_core(server.pid)
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": True}
            error = await asyncio.wait_for(stream_until_error(url, body, lambda: core.send_signal(signal.SIGKILL)),
                                           BOUND_S)  # fmt: skip
            assert error["type"] == "server_error"
            health = await http.get("/health")
            assert health.status_code == 503 and "EngineCore" in health.json()["cause"]
            assert (await http.get("/ready")).status_code == 503
            refused = await http.post("/v1/chat/completions", json={"messages": body["messages"]})
            assert refused.status_code == 503
        assert await asyncio.to_thread(server.wait, BOUND_S) != 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
