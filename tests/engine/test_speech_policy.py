"""The co-scheduler's policy on hand-built stream states: deadlines decide, batches ride along."""

import math

import pytest

from omnitalk.codecs.streaming import StreamingConfig
from omnitalk.engine.speech.config import SpeechConfig
from omnitalk.engine.speech.engine import streaming_config
from omnitalk.engine.speech.policy import (
    SAMPLE_RATE,
    STEP_AUDIO_S,
    Candidate,
    Costs,
    PlaybackClock,
    Work,
    choose,
    pause_bound,
)


def test_deadline_is_arrival_until_first_audio_then_when_the_sent_audio_runs_out():
    clock = PlaybackClock(arrived_at=10.0)
    assert clock.deadline() == 10.0
    clock.sent(SAMPLE_RATE // 2, now=11.0)
    clock.sent(SAMPLE_RATE, now=11.2)
    assert clock.deadline() == 11.0 + 1.5


def test_the_most_urgent_stream_picks_its_bottleneck_and_others_ready_for_it_ride_along():
    candidates = [
        Candidate("relaxed", deadline=5.0, talker_ready=True, code2wav_ready=True),
        Candidate("urgent", deadline=1.0, talker_ready=False, code2wav_ready=True),
        Candidate("talking", deadline=2.0, talker_ready=True, code2wav_ready=False),
    ]
    assert choose(candidates, max_batch=8) == (Work.CODE2WAV, ["urgent", "relaxed"])


def test_a_stream_waiting_for_codes_gets_a_talker_step_for_everyone_ready():
    candidates = [
        Candidate("a", deadline=1.0, talker_ready=True, code2wav_ready=False),
        Candidate("b", deadline=3.0, talker_ready=True, code2wav_ready=True),
        Candidate("c", deadline=2.0, talker_ready=True, code2wav_ready=False),
    ]
    assert choose(candidates, max_batch=2) == (Work.TALKER_STEP, ["a", "c"])


def test_streams_that_cannot_progress_are_skipped_and_idle_is_none():
    waiting = Candidate("waiting-for-thinker", deadline=0.0, talker_ready=False, code2wav_ready=False)
    assert choose([waiting], max_batch=4) is None
    later = Candidate("b", deadline=9.0, talker_ready=True, code2wav_ready=False)
    assert choose([waiting, later], max_batch=4) == (Work.TALKER_STEP, ["b"])


def test_no_stream_starves_under_a_stream_of_newcomers():
    """A stream with audio buffered far ahead still runs once the others' deadlines pass it."""
    clock = PlaybackClock(arrived_at=0.0)
    clock.sent(SAMPLE_RATE * 2, now=0.5)  # 2 s buffered: deadline 2.5
    old = Candidate("old", clock.deadline(), talker_ready=False, code2wav_ready=True)
    newcomers = [Candidate(f"new{i}", 2.6 + i, talker_ready=True, code2wav_ready=False) for i in range(3)]
    assert choose([*newcomers, old], max_batch=8) == (Work.CODE2WAV, ["old"])


def test_a_code2wav_batch_is_cut_to_the_pause_the_talking_streams_can_afford():
    now = 100.0
    due = [
        Candidate(f"due{i}", deadline=now + 0.1 + i / 100, talker_ready=False, code2wav_ready=True) for i in range(8)
    ]
    talking = Candidate("talking", deadline=now + 0.4, talker_ready=True, code2wav_ready=False, playing=True)
    assert pause_bound([*due, talking], now) == pytest.approx(0.2)  # half its 0.4 s of buffered audio
    work, keys = choose([*due, talking], max_batch=64, now=now, costs=Costs(code2wav_row_s=0.05))
    # its margin is the slack less its own next row: half of 0.35 s holds 3 rows of 50 ms
    assert work is Work.CODE2WAV and keys == [f"due{i}" for i in range(3)]
    # without a stream waiting for the talker, or before any cost is measured, the batch is not cut
    assert choose(due, max_batch=64, now=now, costs=Costs(code2wav_row_s=0.05)) == (Work.CODE2WAV, [c.key for c in due])
    assert len(choose([*due, talking], max_batch=64, now=now)[1]) == 8


def test_the_margin_counts_what_the_next_chunk_still_costs():
    """0.4 s of slack, 10 codes of 10 ms and a 100 ms row to go: 0.2 s of margin, half of it to Code2Wav."""
    now, costs = 10.0, Costs(code2wav_row_s=0.1, talker_step_s=0.01)
    talking = Candidate("talking", now + 0.4, talker_ready=True, code2wav_ready=False, playing=True, codes_needed=10)
    assert pause_bound([talking], now, costs) == pytest.approx(0.1)
    due = [Candidate(f"due{i}", now + 0.1, talker_ready=True, code2wav_ready=True, playing=True) for i in range(3)]
    assert pause_bound(due, now, costs) == math.inf  # waiting for Code2Wav, not for the talker
    assert choose([*due, talking], max_batch=8, now=now, costs=costs) == (Work.CODE2WAV, ["due0"])
    assert choose(due, max_batch=8, now=now, costs=costs) == (Work.CODE2WAV, ["due0", "due1", "due2"])


def test_the_pause_bound_has_a_floor_and_one_row_always_runs():
    now = 5.0
    due = [Candidate(f"due{i}", deadline=now - 1 + i / 100, talker_ready=False, code2wav_ready=True) for i in range(6)]
    starting = Candidate("starting", deadline=now - 0.5, talker_ready=True, code2wav_ready=False)
    assert pause_bound([*due, starting], now) == math.inf  # not playing yet: it cannot underrun
    tight = Candidate("tight", deadline=now + 0.03, talker_ready=True, code2wav_ready=False, playing=True)
    assert pause_bound([*due, tight], now) == STEP_AUDIO_S  # 15 ms is under the floor, one step's audio
    assert choose([*due, tight], max_batch=64, now=now, costs=Costs(0.005))[1] == ["due0", "due1", "due2", "due3"]
    roomy = Candidate("roomy", deadline=now + 2.0, talker_ready=True, code2wav_ready=False, playing=True)
    assert choose([*due, roomy], max_batch=64, now=now, costs=Costs(1.0))[1] == ["due0"]  # 0.5 s: under a row


def test_a_stream_already_late_does_not_cut_batches():
    """Behind whatever runs now: cutting would only slow every stream, itself included, by more small batches."""
    now = 5.0
    due = [Candidate(f"due{i}", deadline=now - 1 + i / 100, talker_ready=False, code2wav_ready=True) for i in range(6)]
    late = Candidate("late", deadline=now - 0.5, talker_ready=True, code2wav_ready=False, playing=True)
    assert pause_bound([*due, late], now) == math.inf
    assert choose([*due, late], max_batch=64, now=now, costs=Costs(1.0)) == (Work.CODE2WAV, [c.key for c in due])


def test_speech_settings_choose_code2wav_windows_and_solver():
    config = streaming_config(SpeechConfig(first_chunk_codes=12, ode_solver="euler"))
    assert (config.codes_for_chunk(0), config.solver) == (12, "euler")
    assert streaming_config(SpeechConfig()) == StreamingConfig(first_future_mel=24)  # Qwen's windows, RK4
    for bad in ({"first_chunk_codes": 36}, {"ode_solver": "midpoint"}):
        with pytest.raises(ValueError):
            SpeechConfig(**bad)


def test_once_the_talker_has_waited_the_bound_it_steps_before_more_code2wav():
    now = 50.0
    due = Candidate("due", deadline=now + 0.05, talker_ready=False, code2wav_ready=True)
    talking = Candidate("talking", deadline=now + 0.3, talker_ready=True, code2wav_ready=False, playing=True)
    costs = Costs(code2wav_row_s=0.01)
    assert choose([due, talking], max_batch=8, now=now, costs=costs, talker_waited_s=0.1)[0] is Work.CODE2WAV
    assert choose([due, talking], max_batch=8, now=now, costs=costs, talker_waited_s=0.15) == (
        Work.TALKER_STEP,
        ["talking"],
    )
