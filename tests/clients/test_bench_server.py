"""`omnitalk bench` against the real server on the tiny model, through its async entry (it shares the test's loop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import websockets

from omnitalk.clients.bench.cli import main_async

PNG = b"\x89PNG\r\n\x1a\n"


async def realtime_missing(url: str) -> str | None:
    """Why the server's Realtime endpoint cannot be benchmarked yet, or None when it answers."""
    try:
        async with websockets.connect(url.replace("http://", "ws://") + "/v1/realtime?model=x", open_timeout=30):
            return None
    except (websockets.InvalidStatus, websockets.InvalidHandshake, OSError) as error:
        return f"the Realtime endpoint (WebSocket /v1/realtime) is not implemented yet: {error}"


def requests_file(folder: Path) -> Path:
    soundfile.write(folder / "q.wav", 0.2 * np.sin(np.arange(12_000) / 7), 24_000)  # 0.5 s
    path = folder / "requests.jsonl"
    path.write_text('{"prompt": "Say hello."}\n{"audio": "q.wav", "prompt": "What did I say?"}\n')
    return path


def check_run(run: dict, n: int) -> None:
    m = run["metrics"]
    assert m["completed"] == n and m["failed"] == 0, [r["error"] for r in run["requests"]]
    assert m["request_goodput"] <= m["request_throughput"]
    assert m["total_audio_s"] == pytest.approx(sum(r["audio_bytes"] for r in run["requests"]) / 48_000)
    for r in run["requests"]:
        assert r["audio_bytes"] > 0 and r["ttfa_s"] <= r["e2el_s"]
        assert r["ttft_s"] <= r["e2el_s"]
        assert r["audio_s"] == pytest.approx(r["audio_bytes"] / 48_000)
        assert r["completion_tokens"] and r["rtf"] > 0


@pytest.mark.parametrize("protocol", ["http", "realtime"])
async def test_bench_on_the_server(server, tmp_path, protocol):
    url, _ = server
    if protocol == "realtime" and (why := await realtime_missing(url)):
        pytest.skip(why)
    out = tmp_path / "r.json"
    argv = ["--url", url, "--protocol", protocol, "--concurrency", "2", "--num-requests", "4", "--max-tokens", "8",
            "--inputs", str(requests_file(tmp_path)), "--slo", "ttfa:60000", "rtf:50", "--result-json", str(out),
            "--plot-dir", str(tmp_path / "plots"), "--no-progress"]  # fmt: skip
    assert await main_async(argv) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "omnitalk-tiny-random" and [r["protocol"] for r in data["runs"]] == [protocol]
    check_run(data["runs"][0], 4)
    assert (tmp_path / "plots" / "latency_cdf.png").read_bytes().startswith(PNG)


async def test_bad_voice_fails_every_request_and_exits_1(server, tmp_path, capsys):
    url, _ = server
    out = tmp_path / "r.json"
    argv = ["--url", url, "--voice", "nope", "--num-requests", "2", "--max-tokens", "4", "--result-json", str(out),
            "--no-plots", "--no-progress"]  # fmt: skip
    assert await main_async(argv) == 1
    metrics = json.loads(out.read_text())["runs"][0]["metrics"]
    assert metrics["failed"] == 2 and metrics["completed"] == 0
    assert "HTTP 400" in capsys.readouterr().out
