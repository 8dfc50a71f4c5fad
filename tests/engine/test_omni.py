"""The whole engine on the tiny checkpoint: speech that matches transformers, starts early, batches, cancels."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from oracle import SYSTEM_PROMPT, Reference

from omnitalk.codecs.streaming import SAMPLES_PER_CODE, NoiseBuffer
from omnitalk.engine.omni import AudioDelta, Finished, OmniEngine, OmniRequest, Speech, TextDelta
from omnitalk.engine.request import Message, Sampling, Text
from omnitalk.engine.talker.sampling import TalkerSampling

GREEDY_TALKER = TalkerSampling(temperature=0.0, seed=0, max_tokens=150)  # a random talker may never stop
STREAMED_VS_ONE_SHOT_SNR_DB = 100  # codecs/ streaming vs transformers' one-shot at the same noise


def conversation(text: str) -> tuple[Message, ...]:
    return (Message("system", (Text(SYSTEM_PROMPT),)), Message("user", (Text(text),)))


async def run(engine: OmniEngine, request: OmniRequest):
    events = [event async for event in engine.generate(request)]
    assert isinstance(events[-1], Finished)
    audio = [e for e in events if isinstance(e, AudioDelta)]
    assert [a.offset for a in audio] == [sum(len(b.samples) for b in audio[:i]) for i in range(len(audio))]
    waveform = np.concatenate([a.samples for a in audio]) if audio else np.zeros(0, np.float32)
    return events, waveform


def snr_db(signal: np.ndarray, estimate: np.ndarray) -> float:
    return 10 * np.log10(np.sum(signal.astype(np.float64) ** 2) / np.sum((signal - estimate).astype(np.float64) ** 2))


async def test_spoken_answer_equals_transformers(omni: OmniEngine, reference: Reference):
    messages = conversation("Hello! Please say something.")
    request = OmniRequest("spoken-parity", messages, Sampling(max_tokens=12), Speech("Chelsie", GREEDY_TALKER))
    events, waveform = await run(omni, request)
    usage = events[-1].usage
    frames = usage.audio_tokens * 2
    expected = reference.generate(
        [{"role": m.role, "content": m.content[0].text} for m in messages],
        max_new_tokens=12,
        talker_max_new_tokens=GREEDY_TALKER.max_tokens,
        dit_noise=NoiseBuffer(GREEDY_TALKER.seed).take(0, frames)[None],
    )
    text_ids = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    assert text_ids == expected.thinker_tokens
    assert usage.audio_tokens == len(expected.talker_codes) > 0
    assert len(waveform) == usage.audio_tokens * SAMPLES_PER_CODE == len(expected.waveform)
    assert snr_db(expected.waveform.numpy(), waveform) > STREAMED_VS_ONE_SHOT_SNR_DB


async def test_first_audio_arrives_before_the_thinker_finishes_a_long_answer(omni: OmniEngine):
    talker = TalkerSampling(seed=7)  # sampled, as served by default; this seed speaks for > 48 codes
    request = OmniRequest(
        "long-answer", conversation("Tell me a long story."), Sampling(max_tokens=400), Speech("Ethan", talker)
    )
    events, waveform = await run(omni, request)
    kinds = [type(e) for e in events]
    first_audio, last_text = kinds.index(AudioDelta), len(kinds) - 1 - kinds[::-1].index(TextDelta)
    assert events[-1].usage.text_tokens > 100  # the precondition: a long answer
    assert first_audio < last_text
    assert len(waveform) == events[-1].usage.audio_tokens * SAMPLES_PER_CODE


async def test_concurrent_requests_give_the_audio_each_gives_alone(omni: OmniEngine):
    prompts = ["One.", "Two, a bit longer this time.", "Three: the longest prompt of the three, by far."]

    def request(i: int, text: str) -> OmniRequest:
        speech = Speech("Chelsie" if i % 2 else "Ethan", TalkerSampling(seed=100 + i, max_tokens=120))
        return OmniRequest(f"batch-{i}-{len(text)}", conversation(text), Sampling(max_tokens=40), speech)

    together = await asyncio.gather(*(run(omni, request(i, t)) for i, t in enumerate(prompts)))
    for i, text in enumerate(prompts):
        _, alone = await run(omni, request(i, text))
        assert len(alone) == len(together[i][1]) > 0
        assert np.abs(alone - together[i][1]).max() <= 1e-5 * max(np.abs(alone).max(), 1e-30) + 1e-7


async def test_text_only_requests_skip_the_talker(omni: OmniEngine):
    events, waveform = await run(omni, OmniRequest("text-only", conversation("Hi."), Sampling(max_tokens=8)))
    assert len(waveform) == 0 and events[-1].usage.audio_tokens == 0
    assert omni.speech.num_streams == 0


async def test_leaving_mid_stream_frees_every_stage(omni: OmniEngine):
    request = OmniRequest(
        "cancel-me",
        conversation("Talk for a long time."),
        Sampling(max_tokens=400),
        Speech(sampling=TalkerSampling(seed=7)),
    )
    stream = omni.generate(request)
    async for event in stream:
        if isinstance(event, AudioDelta):
            break
    await stream.aclose()
    for _ in range(50):
        idle = omni.speech.num_streams == 0 and not omni.thinker.llm.output_processor.has_unfinished_requests()
        if idle and omni.speech.talker.num_free_slots == omni.speech.max_batch:
            break
        await asyncio.sleep(0.1)
    assert omni.speech.num_streams == 0
    assert omni.speech.talker.num_free_slots == omni.speech.max_batch
    assert not omni.thinker.llm.output_processor.has_unfinished_requests()
    events, _ = await run(omni, OmniRequest("after-cancel", conversation("Hi."), Sampling(max_tokens=8)))
    assert isinstance(events[-1], Finished)


async def test_unknown_voice_is_a_clear_error(omni: OmniEngine):
    request = OmniRequest("bad-voice", conversation("Hi."), speech=Speech("Nobody"))
    with pytest.raises(ValueError, match="unknown voice 'Nobody'; available: Chelsie, Ethan"):
        await run(omni, request)


async def test_speech_stops_before_its_until_token_as_if_the_answer_ended_there(omni: OmniEngine):
    """A tool call is never spoken: the talker hears the text up to the first `until` token and takes that token
    as the end, exactly as for an answer cut at that token by max_tokens; the text goes on in full."""
    messages = conversation("Tell me about the weather.")
    text_only, _ = await run(omni, OmniRequest("until-text", messages, Sampling(max_tokens=30)))
    tokens = [t for e in text_only if isinstance(e, TextDelta) for t in e.token_ids]
    k = next(i for i in range(4, len(tokens)) if tokens[i] not in tokens[:i])
    talker = TalkerSampling(seed=11, max_tokens=150)
    until = Speech("Chelsie", talker, frozenset({tokens[k]}))
    events, gated = await run(omni, OmniRequest("until-gated", messages, Sampling(max_tokens=30), until))
    assert [t for e in events if isinstance(e, TextDelta) for t in e.token_ids] == tokens
    _, cut = await run(omni, OmniRequest("until-cut", messages, Sampling(max_tokens=k + 1), Speech("Chelsie", talker)))
    assert len(gated) == len(cut) > 0
    assert np.abs(gated - cut).max() <= 1e-5 * max(np.abs(cut).max(), 1e-30) + 1e-7
