"""`omnitalk bench --protocol realtime` taking turns by server VAD, and several turns per session, against the real
server on the tiny model: the utterances are synthetic speech that Silero hears as speech."""

from __future__ import annotations

import json

import pytest

from omnitalk.clients.bench.cli import main_async
from omnitalk.clients.bench.sessions import TurnTaking

PNG = b"\x89PNG\r\n\x1a\n"


def bench_args(url: str, tmp_path, *extra: str) -> list[str]:
    return ["--url", url, "--protocol", "realtime", "--turn-detection", "server_vad", "--max-tokens", "6",
            "--result-json", str(tmp_path / "r.json"), "--plot-dir", str(tmp_path / "plots"), "--no-progress",
            *extra]  # fmt: skip


def successful(run: dict, n: int) -> list[dict]:
    requests = run["requests"]
    assert [r["error"] for r in requests] == [None] * n
    return requests


async def test_server_vad_turns_measure_voice_to_voice_latency(server, tmp_path, capsys):
    url, _ = server
    argv = bench_args(url, tmp_path, "--utterance-s", "1", "2", "--num-requests", "2", "--slo", "turn:600000")
    assert await main_async(argv) == 0
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    short, long = successful(run, 2)
    for r in (short, long):
        assert r["turn_number"] == 1  # one turn per session by default
        assert r["speech_end_s"] < 0  # the server ended the turn after the speech ended, never before
        assert r["turn_s"] == pytest.approx(r["ttfa_s"] - r["speech_end_s"]) and r["turn_s"] > r["ttfa_s"]
    assert (short["input_audio_s"], long["input_audio_s"]) == (1.0, 2.0)
    assert long["prompt_tokens"] - short["prompt_tokens"] >= 15  # the whole second more: 25 audio tokens, one turn
    metrics = run["metrics"]
    assert metrics["good_requests"] == 2 and metrics["median_turn_ms"] > 0
    assert list(run["turn_latency"]["by_utterance_s"]) == ["1.0", "2.0"]
    assert (tmp_path / "plots" / "turn_latency.png").read_bytes().startswith(PNG)
    console = capsys.readouterr().out
    assert "turn (ms)" in console and "turn latency (ms) by utterance s" in console


async def test_several_turns_in_one_session_report_latency_by_turn_number(server, tmp_path, capsys):
    url, _ = server
    argv = bench_args(url, tmp_path, "--utterance-s", "1", "--turns", "3", "--num-requests", "3")
    assert await main_async(argv) == 0
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    turns = successful(run, 3)
    assert [r["turn_number"] for r in turns] == [1, 2, 3]
    prompts = [r["prompt_tokens"] for r in turns]
    assert prompts[0] < prompts[1] < prompts[2]  # the same session: each turn's prompt holds the earlier turns
    assert list(run["turn_latency"]["by_turn_number"]) == ["1", "2", "3"]
    assert "turn latency (ms) by turn" in capsys.readouterr().out


async def test_manual_turns_share_a_session_too(server, tmp_path):
    url, _ = server
    argv = ["--url", url, "--protocol", "realtime", "--utterance-s", "0.5", "--turns", "2", "--num-requests", "2",
            "--max-tokens", "4", "--result-json", str(tmp_path / "r.json"), "--no-plots", "--no-progress"]  # fmt: skip
    assert await main_async(argv) == 0
    first, second = successful(json.loads((tmp_path / "r.json").read_text())["runs"][0], 2)
    assert (first["turn_number"], second["turn_number"]) == (1, 2) and first["prompt_tokens"] < second["prompt_tokens"]
    assert first["turn_s"] > first["ttfa_s"]  # from the last appended chunk, through the commit and response.create


async def test_text_inputs_cannot_take_server_vad_turns(server, tmp_path, capsys):
    url, _ = server
    assert await main_async(bench_args(url, tmp_path, "--num-requests", "1", "--no-plots")) == 1
    assert "server VAD turns need spoken inputs" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [{"detection": "semantic"}, {"turns": 0}, {"silence_ms": 10}])
def test_turn_taking_rejects_what_no_session_can_do(bad):
    with pytest.raises(ValueError):
        TurnTaking(**bad)
