"""The speech engine with a Code2Wav worker process: the worker's rows decode while the speech thread goes on,
give the audio the thread alone gives, and a worker that dies or a stream closed meanwhile loses nothing else."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from talker_inputs import synthetic

from omnitalk.codecs.code2wav import Code2Wav
from omnitalk.codecs.streaming import SAMPLES_PER_CODE
from omnitalk.codecs.workers import WorkerDied
from omnitalk.engine.speech.engine import AudioChunk, SpeechDone, SpeechEngine, SpeechEvent, SpeechFailed
from omnitalk.engine.talker import Talker, TalkerSequence

CODES = 120  # four chunks with Qwen's windows
WAIT_S = 120.0


@pytest.fixture(scope="module")
def speech(tiny_dir) -> Iterator[SpeechEngine]:
    code2wav = Code2Wav.from_checkpoint(tiny_dir)
    code2wav.start_workers(1)
    engine = SpeechEngine(Talker.from_checkpoint(tiny_dir, max_seqs=4), code2wav, max_batch=4)
    yield engine
    engine.shutdown()  # and the worker


class Streams:
    """Opens streams on a speech engine and keeps each one's events."""

    def __init__(self, engine: SpeechEngine) -> None:
        self.engine = engine
        self.events: dict[str, list[SpeechEvent]] = {}
        self._ended: dict[str, threading.Event] = {}

    def open(self, seq: TalkerSequence) -> None:
        key = seq.request_id
        self.events[key], self._ended[key] = [], threading.Event()

        def sink(event: SpeechEvent) -> None:
            self.events[key].append(event)
            if not isinstance(event, AudioChunk):
                self._ended[key].set()

        engine = self.engine
        engine.open(key, seq.prompt_ids, None, "Chelsie", seq.sampling, sink)
        engine.add_rows(key, 0, seq.take_prefill()[0])
        engine.add_rows(key, len(seq.prompt_ids) + 1, seq._take(seq.num_rows - len(seq.prompt_ids) - 1))
        engine.add_tokens(key, seq.tokens)
        engine.thinker_done(key)

    def end(self, key: str) -> SpeechEvent:
        assert self._ended[key].wait(WAIT_S)
        return self.events[key][-1]

    def audio(self, key: str) -> np.ndarray:
        return np.concatenate([e.samples for e in self.events[key] if isinstance(e, AudioChunk)])


def wait_offloaded(engine: SpeechEngine, before: int) -> None:
    """Waits until the engine has handed a worker more rows than `before` (an event, not a timing)."""
    deadline = time.monotonic() + WAIT_S
    while engine.stats().code2wav_offloaded_rows <= before:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_rows_decoded_in_the_worker_give_the_threads_audio(speech: SpeechEngine, tiny_dir) -> None:
    alone = SpeechEngine(
        Talker.from_checkpoint(tiny_dir, max_seqs=4), speech.code2wav.with_config(speech.code2wav.config)
    )
    try:
        ours, theirs = Streams(speech), Streams(alone)
        for i, name in enumerate("abc"):
            ours.open(synthetic(name, 40, CODES, i))
            theirs.open(synthetic(name, 40, CODES, i))
        for name in "abc":
            assert ours.end(name) == theirs.end(name) == SpeechDone(CODES, "length")
            got, want = ours.audio(name), theirs.audio(name)
            assert len(got) == len(want) == CODES * SAMPLES_PER_CODE
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()  # batched == alone's tolerance
        stats = speech.stats()
        assert 0 < stats.code2wav_offloaded_rows < stats.code2wav_rows  # shared between the worker and the thread
        assert alone.stats().code2wav_offloaded_rows == 0
    finally:
        alone.shutdown()


def test_a_worker_killed_holding_rows_fails_those_streams_and_the_next_are_served(speech: SpeechEngine) -> None:
    worker = speech.code2wav.workers[0].pid
    os.kill(worker, signal.SIGSTOP)  # it takes the rows but cannot answer
    streams, before = Streams(speech), speech.stats().code2wav_offloaded_rows
    streams.open(synthetic("held", 40, CODES))
    wait_offloaded(speech, before)
    os.kill(worker, signal.SIGKILL)
    failed = streams.end("held")
    assert isinstance(failed, SpeechFailed) and isinstance(failed.error, WorkerDied)
    assert speech.code2wav.workers[0].pid != worker
    before = speech.stats().code2wav_offloaded_rows
    streams.open(synthetic("after", 40, CODES))
    assert streams.end("after") == SpeechDone(CODES, "length")
    assert len(streams.audio("after")) == CODES * SAMPLES_PER_CODE
    assert speech.stats().code2wav_offloaded_rows > before  # the fresh worker took rows
    assert speech.num_streams == 0 and speech.talker.num_free_tokens == speech.talker.blocks.num_tokens


def test_a_stream_closed_while_its_chunk_decodes_in_the_worker_gets_nothing_more(speech: SpeechEngine) -> None:
    worker = speech.code2wav.workers[0].pid
    os.kill(worker, signal.SIGSTOP)
    streams, before = Streams(speech), speech.stats().code2wav_offloaded_rows
    try:
        streams.open(synthetic("closed", 40, CODES))
        wait_offloaded(speech, before)
        speech.close("closed")
    finally:
        os.kill(worker, signal.SIGCONT)
    streams.open(synthetic("next", 40, CODES))
    assert streams.end("next") == SpeechDone(CODES, "length")
    assert streams.events["closed"] == []  # its only chunk was in the worker: dropped when it answered
    assert speech.code2wav.workers[0].pid == worker and not speech.code2wav.workers[0].busy
    assert speech.num_streams == 0 and speech.talker.num_free_tokens == speech.talker.blocks.num_tokens
