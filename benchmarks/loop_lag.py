"""Event-loop lag of the API process under load: 8 spoken streams, then a 60 s video request arriving.

The app and the engine run in this process, as under `omnitalk serve`; a probe task on the same event loop
sleeps 1 ms at a time and records how late it wakes. The clients run on an event loop of their own, in
another thread (they share the GIL, as a co-located client would).

.venv/bin/python benchmarks/loop_lag.py [--model DIR] [--streams 8] [--video-seconds 60] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import time
from pathlib import Path

import av
import httpx
import numpy as np
import uvicorn

from omnitalk.engine.omni import OmniEngine
from omnitalk.engine.tiny.checkpoint import tiny_checkpoint
from omnitalk.server.app import create_app, engine_config
from omnitalk.server.settings import ServerSettings
from omnitalk.server.state import ServerState

PROBE_S = 0.001


def video_data_url(seconds: float, fps: int = 4, size: int = 112) -> str:
    """An mp4 of moving noise with a 48 kHz tone soundtrack."""
    buffer, rng = io.BytesIO(), np.random.default_rng(0)
    with av.open(buffer, "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size, size, "yuv420p"
        sound = container.add_stream("aac", rate=48_000, layout="mono")
        t = np.arange(int(seconds * 48_000)) / 48_000
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None], format="flt")
        frame.sample_rate = 48_000
        container.mux([*sound.encode(frame), *sound.encode(None)])
        for _ in range(int(seconds * fps)):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(video.encode(None))
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


async def probe(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(PROBE_S)
        lags.append(loop.time() - start - PROBE_S)


async def spoken(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> int:
    body = {
        "model": "any",
        "messages": [{"role": "user", "content": f"Tell me story number {i} about a lighthouse."}],
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "pcm16"},
        "max_tokens": max_tokens,
        "stream": True,
    }
    received = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            received += len(line)
    return received


async def video(client: httpx.AsyncClient, url: str, data_url: str) -> int:
    content = [{"type": "video_url", "video_url": {"url": data_url}}, {"type": "text", "text": "What happens?"}]
    body = {"model": "any", "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    response = await client.post(url + "/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["usage"]["prompt_tokens"]


async def load(url: str, args: argparse.Namespace, data_url: str) -> tuple[list[int], int, float]:
    async with httpx.AsyncClient(timeout=900) as client:
        start = time.perf_counter()
        streams = [asyncio.create_task(spoken(client, url, i, args.max_tokens)) for i in range(args.streams)]
        await asyncio.sleep(args.video_delay)
        prompt_tokens = await video(client, url, data_url)
        return await asyncio.gather(*streams), prompt_tokens, time.perf_counter() - start


def summary(name: str, lags: list[float]) -> str:
    ms = sorted(1000 * x for x in lags)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"{name}: {len(ms)} probes, lag p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"


async def measure(url: str, args: argparse.Namespace, data_url: str) -> None:
    for phase in ("idle", "load"):
        lags: list[float] = []
        stop = asyncio.Event()
        probing = asyncio.create_task(probe(lags, stop))
        if phase == "idle":
            await asyncio.sleep(3)
        else:  # the clients' own event loop, in a worker thread
            received, prompt_tokens, wall = await asyncio.to_thread(asyncio.run, load(url, args, data_url))
            print(f"{args.streams} spoken streams ({sum(received)} SSE bytes) + a {args.video_seconds:.0f} s video "
                  f"({prompt_tokens} prompt tokens) in {wall:.1f} s")  # fmt: skip
        stop.set()
        await probing
        print(summary(phase, lags))


async def main(args: argparse.Namespace) -> None:
    settings = ServerSettings(model=args.model or tiny_checkpoint(), max_concurrent_streams=args.streams + 1)
    engine = await asyncio.to_thread(OmniEngine.start, engine_config(settings))
    app = create_app(ServerState(settings, "bench", engine))
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    data_url = await asyncio.to_thread(video_data_url, args.video_seconds)
    try:
        await measure(url, args, data_url)
    finally:
        server.should_exit = True
        await serving
        engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--video-seconds", type=float, default=60.0)
    parser.add_argument("--video-delay", type=float, default=1.0, help="seconds after the streams start")
    parser.add_argument("--max-tokens", type=int, default=48)
    asyncio.run(main(parser.parse_args()))
