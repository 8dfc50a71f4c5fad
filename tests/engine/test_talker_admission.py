"""Streams into the talker's pool through the speech engine: long prompts spoken whole, a full pool queues,
a stream that can never fit fails alone before any audio; and 200 s of audio in, through the whole engine."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
from oracle import SYSTEM_PROMPT
from talker_inputs import pool_gib, synthetic

from omnitalk.codecs.code2wav import Code2Wav
from omnitalk.codecs.streaming import SAMPLES_PER_CODE
from omnitalk.engine.omni import AudioDelta, Finished, OmniEngine, OmniRequest, Speech
from omnitalk.engine.request import Audio, Message, Sampling, Text
from omnitalk.engine.speech.engine import AudioChunk, SpeechDone, SpeechEngine, SpeechEvent, SpeechFailed
from omnitalk.engine.talker import Talker, TalkerSampling, TalkerSequence
from omnitalk.engine.thinker.engine import ThinkerEngine

POOL_TOKENS = 10_240  # two streams of a 4500-token prompt and 60 codes (4561 tokens each), not three


@pytest.fixture(scope="module")
def code2wav(tiny_dir) -> Code2Wav:
    return Code2Wav.from_checkpoint(tiny_dir)


@pytest.fixture
def two_stream_pool(tiny_dir, code2wav: Code2Wav) -> Iterator[SpeechEngine]:
    """A speech engine whose talker pool holds two of the streams below, not three."""
    talker = Talker.from_checkpoint(tiny_dir, max_seqs=4, memory_gib=pool_gib(POOL_TOKENS))
    engine = SpeechEngine(talker, code2wav, max_batch=4)
    yield engine
    engine.shutdown()


class Recorder:
    """Every stream's events in the one order the speech thread emitted them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, SpeechEvent]] = []
        self._ended: dict[str, threading.Event] = {}

    def sink(self, key: str):
        self._ended[key] = threading.Event()

        def record(event: SpeechEvent) -> None:
            self.events.append((key, event))
            if not isinstance(event, AudioChunk):
                self._ended[key].set()

        return record

    def wait(self) -> None:
        for ended in self._ended.values():
            assert ended.wait(timeout=120)

    def of(self, key: str) -> list[SpeechEvent]:
        return [event for k, event in self.events if k == key]

    def first(self, key: str, kind: type) -> int:
        return next(i for i, (k, event) in enumerate(self.events) if k == key and isinstance(event, kind))


def stream(engine: SpeechEngine, recorder: Recorder, seq: TalkerSequence) -> None:
    """What OmniEngine does with a thinker's stream: open, rows, tokens, done."""
    engine.open(seq.request_id, seq.prompt_ids, None, "Chelsie", seq.sampling, recorder.sink(seq.request_id))
    engine.add_rows(seq.request_id, 0, seq.take_prefill()[0])
    engine.add_rows(seq.request_id, len(seq.prompt_ids) + 1, seq._take(seq.num_rows - len(seq.prompt_ids) - 1))
    engine.add_tokens(seq.request_id, seq.tokens)
    engine.thinker_done(seq.request_id)


def record_pool_use(talker: Talker) -> list[tuple[str, str]]:
    """Spies on the talker's real `add` and `free`: (what, request id) in the order the speech thread ran them."""
    log: list[tuple[str, str]] = []
    add, free = talker.add, talker.free

    def spied_add(seq: TalkerSequence) -> None:
        add(seq)
        log.append(("add", seq.request_id))

    def spied_free(seq: TalkerSequence) -> None:
        if seq.slot is not None:
            log.append(("free", seq.request_id))
        free(seq)

    talker.add, talker.free = spied_add, spied_free  # type: ignore[method-assign]
    return log


def test_a_full_pool_queues_streams_and_serves_each_whole(two_stream_pool: SpeechEngine):
    speech = two_stream_pool
    recorder, pool_use = Recorder(), record_pool_use(speech.talker)
    seqs = [synthetic(name, 4500, 60, i) for i, name in enumerate("abc")]
    assert speech.talker.num_tokens_needed(seqs[0]) == 4561
    for seq in seqs:
        stream(speech, recorder, seq)
    recorder.wait()
    for seq in seqs:
        *chunks, done = recorder.of(seq.request_id)
        assert done == SpeechDone(60, "length")
        assert sum(len(c.samples) for c in chunks) == 60 * SAMPLES_PER_CODE
    # "c" waited for the pool: it was added only once "a" or "b" had finished and released its tokens
    assert pool_use[:2] == [("add", "a"), ("add", "b")]
    assert pool_use.index(("add", "c")) > min(pool_use.index(("free", k)) for k in "ab")
    assert speech.num_streams == 0 and speech.talker.num_free_tokens == POOL_TOKENS


def test_a_stream_that_can_never_fit_fails_alone_before_any_audio(two_stream_pool: SpeechEngine):
    speech = two_stream_pool
    recorder = Recorder()
    fits, impossible = synthetic("fits", 4500, 60), synthetic("impossible", 4500, 6000)
    stream(speech, recorder, fits)
    stream(speech, recorder, impossible)
    recorder.wait()
    [failed] = recorder.of("impossible")
    assert isinstance(failed, SpeechFailed) and isinstance(failed.error, ValueError)
    assert "may need 10501 tokens of talker KV cache, more than its whole pool of 10240" in str(failed.error)
    assert recorder.of("fits")[-1] == SpeechDone(60, "length")
    assert speech.num_streams == 0 and speech.talker.num_free_tokens == POOL_TOKENS


async def test_through_the_engine_an_impossible_stream_is_a_clear_error_and_speech_goes_on(
    thinker: ThinkerEngine, tiny_dir, code2wav: Code2Wav
):
    talker = Talker.from_checkpoint(tiny_dir, max_seqs=2, memory_gib=pool_gib(POOL_TOKENS))
    speech = SpeechEngine(talker, code2wav, max_batch=2)
    omni = OmniEngine(thinker, speech)
    hello = (Message("system", (Text(SYSTEM_PROMPT),)), Message("user", (Text("Hi."),)))
    try:
        impossible = Speech(sampling=TalkerSampling(max_tokens=20_000))
        with pytest.raises(ValueError, match="more than its whole pool of 10240: raise talker_memory_gib"):
            await spoken(omni, OmniRequest("impossible", hello, Sampling(max_tokens=4), impossible))
        fits = Speech(sampling=TalkerSampling(seed=3, max_tokens=60))
        finished, samples = await spoken(omni, OmniRequest("after-impossible", hello, Sampling(max_tokens=8), fits))
        assert samples == finished.usage.audio_tokens * SAMPLES_PER_CODE > 0
        assert speech.num_streams == 0 and talker.num_free_tokens == POOL_TOKENS
    finally:
        speech.shutdown()


async def spoken(omni: OmniEngine, request: OmniRequest) -> tuple[Finished, int]:
    """The request's finish and its number of audio samples."""
    events = [event async for event in omni.generate(request)]
    assert isinstance(events[-1], Finished)
    return events[-1], sum(len(e.samples) for e in events if isinstance(e, AudioDelta))


async def test_200_seconds_of_audio_in_get_their_whole_answer_spoken(omni: OmniEngine):
    """A prompt far past 4096 positions, through the thinker (vLLM), the talker and Code2Wav."""
    t = np.arange(200 * 16_000) / 16_000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 40 * np.sin(t)) * t)).astype(np.float32)
    messages = (
        Message("system", (Text(SYSTEM_PROMPT),)),
        Message("user", (Audio(audio), Text("What do you hear?"))),
    )
    speech = Speech("Chelsie", TalkerSampling(temperature=0, max_tokens=60))
    events = [
        event async for event in omni.generate(OmniRequest("long-audio", messages, Sampling(max_tokens=6), speech))
    ]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.usage.prompt_tokens > 5000
    assert finished.usage.audio_tokens == 60  # max_tokens: a random talker never says codec eos
    assert sum(len(e.samples) for e in events if isinstance(e, AudioDelta)) == 60 * SAMPLES_PER_CODE
