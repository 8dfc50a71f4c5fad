"""The bench's maths: percentiles, TPOT, RTF, jitter, the simulated player's underruns, SLOs, goodput, turn latency."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omnitalk.clients.bench.metrics import (
    BYTES_PER_AUDIO_SECOND,
    RequestRecord,
    Underrun,
    meets_slos,
    parse_slos,
    simulate_player,
    summarize,
    turn_latency_by,
)


def record(index: int = 0, *, ttft: float = 0.1, e2el: float = 1.0, tokens: int = 10, audio=(), ok: bool = True):
    """A finished request; `audio` is [(arrival s, seconds of audio)]."""
    r = RequestRecord(index, "http", f"in{index}", success=ok, ttft_s=ttft, e2el_s=e2el, completion_tokens=tokens)
    r.audio_times_s = [t for t, _ in audio]
    r.audio_chunk_bytes = [int(d * BYTES_PER_AUDIO_SECOND) for _, d in audio]
    return r


def test_percentiles_and_names_follow_vllm():
    records = [record(i, ttft=(i + 1) / 1000) for i in range(100)]  # 1..100 ms
    m = summarize(records, duration=10.0, slos={})
    assert m["completed"] == 100 and m["failed"] == 0
    assert m["mean_ttft_ms"] == pytest.approx(50.5)
    assert m["median_ttft_ms"] == pytest.approx(50.5) == m["p50_ttft_ms"]
    assert m["p99_ttft_ms"] == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert m["p90_ttft_ms"] == pytest.approx(90.1)
    assert m["request_throughput"] == pytest.approx(10.0)
    assert m["request_goodput"] is None  # no SLOs given
    for name in ("ttft", "tpot", "itl", "e2el", "ttfa", "jitter", "underrun"):
        assert {f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms", f"p95_{name}_ms"} <= set(m)
    assert "p99_rtf" in m and m["p99_ttfa_ms"] is None  # no audio at all: no TTFA


def test_tpot_is_vllms():
    assert record(ttft=0.2, e2el=2.2, tokens=11).tpot_s == pytest.approx(0.2)
    assert record(tokens=1).tpot_s is None  # one token: no time per output token


def test_audio_seconds_ttfa_rtf_and_jitter():
    r = record(audio=[(0.5, 0.5), (0.8, 0.5), (1.5, 1.0)])
    assert r.audio_bytes == 2 * BYTES_PER_AUDIO_SECOND and r.audio_s == 2.0
    assert r.ttfa_s == 0.5
    assert r.rtf == pytest.approx(1.5 / 2.0)  # last audio byte's arrival / audio seconds
    assert r.jitter_s == pytest.approx(np.std([0.3, 0.7]))
    assert record(audio=[(0.5, 0.5), (0.8, 0.5)]).jitter_s is None  # one gap: no spread to speak of


def test_player_that_never_starves():
    # Chunks of 1 s arriving every 0.5 s: the player is always ahead.
    assert simulate_player([0.0, 0.5, 1.0, 1.5], [1.0] * 4) == Underrun(0.0, 0.0, 0)


def test_player_underruns_on_a_hand_made_schedule():
    # Plays [0, 0.5); second chunk at 0.7 -> 0.2 s starved, plays [0.7, 1.2); third at 1.0 is early: [1.2, 1.7);
    # fourth at 2.5 -> 0.8 s starved.
    u = simulate_player([0.0, 0.7, 1.0, 2.5], [0.5, 0.5, 0.5, 0.5])
    assert u.events == 2
    assert u.total_s == pytest.approx(1.0)
    assert u.worst_s == pytest.approx(0.8)
    r = record(audio=[(0.0, 0.5), (0.7, 0.5), (1.0, 0.5), (2.5, 0.5)])
    assert r.to_json()["underrun_events"] == 2 and r.to_json()["underrun_worst_s"] == pytest.approx(0.8)


def test_slo_parsing():
    assert parse_slos(["ttfa:500", "rtf:1"]) == {"ttfa": 500.0, "rtf": 1.0}
    assert parse_slos(["ttft:300,e2el:3000"]) == {"ttft": 300.0, "e2el": 3000.0}
    assert parse_slos([]) == {}
    for bad in ("ttfa", "speed:3", "ttfa:fast", "ttfa:-1", "rtf:0", "ttft:inf"):
        with pytest.raises(ValueError, match="bad SLO"):
            parse_slos([bad])


def test_a_request_is_good_only_when_it_meets_every_slo():
    fast = record(ttft=0.1, audio=[(0.2, 1.0)])  # TTFA 200 ms, RTF 0.2
    slow = record(ttft=0.1, audio=[(0.9, 1.0)])  # TTFA 900 ms, RTF 0.9
    slos = parse_slos(["ttfa:500", "rtf:1"])
    assert meets_slos(fast, slos) and not meets_slos(slow, slos)
    assert not meets_slos(record(), slos)  # no audio: no TTFA, so not good
    assert not meets_slos(record(ok=False, audio=[(0.1, 1.0)]), slos)
    assert meets_slos(record(tokens=1), {"tpot": 10})  # one token: TPOT counts as 0, as in vllm


def test_goodput_never_exceeds_throughput():
    rng = np.random.default_rng(0)
    records = [
        record(i, ttft=rng.uniform(0.01, 1), audio=[(rng.uniform(0.1, 1), 1.0)], ok=rng.random() > 0.2)
        for i in range(200)
    ]
    m = summarize(records, duration=20.0, slos=parse_slos(["ttfa:500", "ttft:400"]))
    assert m["completed"] + m["failed"] == 200
    assert 0 < m["request_goodput"] <= m["request_throughput"]
    assert m["good_requests"] <= m["completed"]
    assert m["slo_attainment"] == pytest.approx(m["good_requests"] / 200)
    assert m["total_audio_s"] == pytest.approx(m["completed"])
    assert math.isclose(m["audio_throughput"], m["completed"] / 20.0)


def test_turn_latency_runs_from_the_end_of_speech_to_the_first_audio_byte():
    r = record(audio=[(0.3, 0.1), (0.5, 0.1)])
    assert r.turn_s is None  # nobody spoke: no voice-to-voice latency
    r.speech_end_s = -0.7  # the speech ended 0.7 s before the request started (server VAD's silence)
    assert r.turn_s == pytest.approx(1.0) and r.to_json()["turn_s"] == pytest.approx(1.0)
    assert parse_slos(["turn:800"]) == {"turn": 800.0}
    assert not meets_slos(r, {"turn": 800}) and meets_slos(r, {"turn": 1200})
    silent = record()
    silent.speech_end_s = -0.5
    assert silent.turn_s is None and not meets_slos(silent, {"turn": 1e9})  # no audio: the turn SLO fails
    m = summarize([r], 2.0, {"turn": 1200})
    assert m["median_turn_ms"] == pytest.approx(1000.0) and m["good_requests"] == 1


def test_turn_latency_grouped_by_utterance_length_and_turn_number():
    records = []
    for i, (seconds, number, turn) in enumerate([(2.04, 1, 0.5), (1.96, 2, 0.7), (10.0, 1, 0.9), (10.0, 2, 1.1)]):
        r = record(
            i,
            audio=[(0.1, 0.1)],
        )
        r.input_audio_s, r.turn_number, r.speech_end_s = seconds, number, 0.1 - turn
        records.append(r)
    records.append(record(4, ok=False))  # a failed turn counts nowhere
    by_length = turn_latency_by(records, "input_audio_s")
    assert list(by_length) == [2.0, 10.0] and [g["count"] for g in by_length.values()] == [2, 2]
    assert by_length[2.0]["median_turn_ms"] == pytest.approx(600.0)
    by_number = turn_latency_by(records, "turn_number")
    assert list(by_number) == [1, 2] and by_number[2]["mean_turn_ms"] == pytest.approx(900.0)
