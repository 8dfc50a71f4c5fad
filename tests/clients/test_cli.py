"""`omnitalk bench` end to end against a fake server: exit codes, the JSON's consistency, plots, error paths."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from omnitalk.clients.bench.cli import main_async, normalize_url

PNG = b"\x89PNG\r\n\x1a\n"
AUDIO_S, TEXT = 0.3, "Hello there friend"  # what the fake server (conftest.py here) answers


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_url_is_a_clear_message_and_exit_2(capsys, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    assert await main_async(["--url", url, "--result-json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {url}" in err and "Is the server running" in err
    assert not (tmp_path / "r.json").exists()


def test_unreachable_url_from_the_command_line():
    url = f"127.0.0.1:{closed_port()}"
    for command in ([sys.executable, "-m", "omnitalk.clients.bench"], [str(Path(sys.executable).parent / "omnitalk"),
                                                                       "bench"]):  # fmt: skip
        done = subprocess.run([*command, "--url", url], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert f"cannot reach http://{url}" in done.stderr


async def test_bad_arguments_exit_2(capsys):
    for argv in (["--url", "x", "--slo", "speed:1"], ["--url", "x", "--sweep"], ["--url", "x", "--rate", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            await main_async(argv)
        assert exit_.value.code == 2
    assert "bad SLO" in capsys.readouterr().err


def test_urls_are_normalized():
    assert normalize_url("ws://h:1/v1/realtime?model=m") == "http://h:1"
    assert normalize_url("https://h/v1/") == "https://h"
    assert normalize_url("h:8000") == "http://h:8000"


def jsonl_with_audio(folder: Path) -> Path:
    soundfile.write(folder / "q.wav", 0.1 * np.sin(np.arange(7200) / 5), 24_000)  # 0.3 s
    path = folder / "requests.jsonl"
    path.write_text('{"prompt": "Hi?", "max_tokens": 8}\n{"audio": "q.wav", "prompt": "What is said?"}\n')
    return path


def check_consistent(run: dict, n: int) -> None:
    m = run["metrics"]
    assert m["completed"] == n and m["failed"] == 0
    assert m["request_goodput"] <= m["request_throughput"]
    assert m["total_audio_s"] == pytest.approx(n * AUDIO_S)
    for r in run["requests"]:
        assert r["success"] and r["error"] is None
        assert r["ttft_s"] <= r["ttfa_s"] <= r["e2el_s"]
        assert r["audio_s"] == pytest.approx(r["audio_bytes"] / 48_000) == pytest.approx(AUDIO_S)
        assert r["audio_bytes"] == sum(r["audio_chunk_bytes"])
        assert r["rtf"] == pytest.approx(r["audio_times_s"][-1] / r["audio_s"])
        assert r["output_text"] == TEXT and r["completion_tokens"] == 18


async def test_both_protocols_against_a_fake_server(fake_server, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--url", fake_server, "--protocol", "both", "--concurrency", "2", "--num-requests", "4",
            "--inputs", str(jsonl_with_audio(tmp_path)), "--slo", "ttfa:5000", "rtf:20",
            "--result-json", str(out), "--plot-dir", str(tmp_path / "plots")]  # fmt: skip
    assert await main_async(argv) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "fake-omni" and data["slos"] == {"ttfa": 5000.0, "rtf": 20.0}
    assert [run["protocol"] for run in data["runs"]] == ["http", "realtime"]
    for run in data["runs"]:
        check_consistent(run, 4)
        assert run["metrics"]["max_concurrency"] == 2
    spoken = [r for r in data["runs"][1]["requests"] if r["input_id"] == "line2"]
    assert spoken and all(r["input_audio_s"] == pytest.approx(0.3) for r in spoken)
    assert all(r["turn_s"] > r["ttfa_s"] for r in spoken)  # from the last chunk sent, through commit and create
    assert all(r["turn_s"] is None for r in data["runs"][1]["requests"] if r["input_id"] == "line1")  # no speech
    assert (tmp_path / "plots" / "latency_cdf.png").read_bytes().startswith(PNG)
    console = capsys.readouterr().out
    assert "TTFA (ms)" in console and "concurrency 2" in console


async def test_server_errors_count_as_failed_and_exit_1(fake_server, tmp_path, capsys):
    for protocol in ("http", "realtime"):
        out = tmp_path / f"{protocol}.json"
        argv = ["--url", fake_server, "--protocol", protocol, "--voice", "nope", "--num-requests", "3",
                "--result-json", str(out), "--no-plots", "--no-progress"]  # fmt: skip
        assert await main_async(argv) == 1
        metrics = json.loads(out.read_text())["runs"][0]["metrics"]
        assert metrics["failed"] == 3 and metrics["completed"] == 0 and metrics["request_throughput"] == 0
        assert "unsupported voice 'nope'" in capsys.readouterr().out


async def test_sweep_and_ramp_plots(fake_server, tmp_path):
    sweep = ["--url", fake_server, "--sweep", "--slo", "ttfa:5000", "--sweep-start", "2", "--max-rate", "8",
             "--sweep-duration", "1", "--max-runs", "3", "--result-json", str(tmp_path / "s.json")]  # fmt: skip
    assert await main_async(sweep) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["sweeps"]["http"]["best_rate"] == 8.0
    assert [t["rate"] for t in data["sweeps"]["http"]["tried"]] == [2.0, 4.0, 8.0]
    assert (tmp_path / "s-plots" / "ttfa_rtf_vs_load.png").read_bytes().startswith(PNG)
    ramp = ["--url", fake_server, "--ramp", "2", "10", "--duration", "1.5", "--result-json", str(tmp_path / "r.json")]
    assert await main_async(ramp) == 0
    rates = [r["offered_rate"] for r in json.loads((tmp_path / "r.json").read_text())["runs"][0]["requests"]]
    assert rates == sorted(rates) and 2.0 <= rates[0] < rates[-1] <= 10.0
    assert (tmp_path / "r-plots" / "ttfa_rtf_vs_rate.png").stat().st_size > 1000
