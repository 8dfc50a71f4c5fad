"""Through the engine: a session's later spoken turn takes the talker's KV of its earlier turns' prompt from the pool
(counted), speaks as the same conversation sent at once, and the session's end drops those blocks."""

from __future__ import annotations

import asyncio

import numpy as np
from thinker_cases import tone

from omnitalk.engine.omni import AudioDelta, Finished, OmniEngine, OmniRequest, Speech, Usage
from omnitalk.engine.request import Audio, Message, Sampling, Text
from omnitalk.engine.talker.runner import BLOCK_SIZE
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.engine.thinker.prompt import SPEECH_SYSTEM_PROMPT

TIMEOUT = 180.0
SYSTEM = Message("system", (Text(SPEECH_SYSTEM_PROMPT),))
SPEECH = Speech("Chelsie", TalkerSampling(temperature=0.0, seed=0, max_tokens=120))


async def speak(omni: OmniEngine, request_id: str, messages, session: str | None) -> tuple[Usage, np.ndarray]:
    async def drain() -> list:
        request = OmniRequest(request_id, messages, Sampling(max_tokens=8), SPEECH, session=session)
        return [event async for event in omni.generate(request)]

    events = await asyncio.wait_for(drain(), TIMEOUT)
    assert isinstance(events[-1], Finished)
    audio = [e.samples for e in events if isinstance(e, AudioDelta)]
    return events[-1].usage, np.concatenate(audio) if audio else np.zeros(0, np.float32)


async def cached_blocks_settle_at(omni: OmniEngine, count: int) -> bool:
    """Polled: forgetting is a command to the speech thread."""
    for _ in range(100):
        if omni.speech.talker.blocks.num_cached_blocks == count:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_later_turn_reuses_the_talkers_prompt_blocks_and_speaks_as_sent_at_once(omni: OmniEngine):
    talker, session = omni.speech.talker, "sess-talker"
    blocks_before, cached_before = talker.blocks.num_cached_blocks, talker.num_cached_tokens
    first = (SYSTEM, Message("user", (Audio(tone(5.0, hz=210.0, seed=21)),)))
    one, _ = await speak(omni, "tk1", first, session)
    assert talker.num_cached_tokens == cached_before  # nothing of the session was cached yet
    assert talker.blocks.num_cached_blocks == blocks_before + one.prompt_tokens // BLOCK_SIZE
    second = (*first, Message("assistant", (Text("Yes."),)), Message("user", (Audio(tone(2.2, seed=22)),)))
    two, waveform = await speak(omni, "tk2", second, session)
    # the first turn's prompt is a prefix of the second's: each of its full blocks came from the pool
    assert talker.num_cached_tokens - cached_before == one.prompt_tokens // BLOCK_SIZE * BLOCK_SIZE
    alone_usage, alone = await speak(omni, "tk2-alone", second, None)
    assert talker.num_cached_tokens - cached_before == one.prompt_tokens // BLOCK_SIZE * BLOCK_SIZE
    assert two.audio_tokens == alone_usage.audio_tokens > 0 and len(waveform) == len(alone)
    assert np.abs(waveform - alone).max() <= 1e-5 * max(np.abs(alone).max(), 1e-30) + 1e-7
    assert talker.blocks.num_cached_blocks == blocks_before + two.prompt_tokens // BLOCK_SIZE
    omni.forget_session(session)
    assert await cached_blocks_settle_at(omni, blocks_before)
    assert omni.thinker.sessions.get(session) is None
    assert talker.num_free_tokens == talker.blocks.num_tokens


PIECE = 1600  # 100 ms of audio per append, as a Realtime client sends it


async def test_an_ingested_turn_finds_its_prompt_prefilled_ahead_and_speaks_as_sent_at_once(omni: OmniEngine):
    """While the second turn is spoken, the talker prefills the blocks of its prompt the thinker has streamed (past
    the first turn's cached ones); the answer takes every one of them and speaks as the conversation sent at once."""
    talker, session = omni.speech.talker, "sess-ahead"
    blocks_before, ahead_before = talker.blocks.num_cached_blocks, talker.num_ahead_tokens
    first = (SYSTEM, Message("user", (Audio(tone(3.1, hz=230.0, seed=31)),)))
    one, _ = await speak(omni, "ta1", first, session)
    history = (*first, Message("assistant", (Text("I hear it."),)))
    samples = tone(6.7, hz=190.0, seed=32)
    ingest = omni.ingest("ta2", history, hidden_states=True, session=session)
    await asyncio.wait_for(ingest.start(), TIMEOUT)
    for start in range(0, len(samples), PIECE):
        ingest.push_audio(samples[start : start + PIECE])
        await asyncio.wait_for(ingest.wait_prefilled(ingest.pushed_blocks), TIMEOUT)
    assert await blocks_ahead_settle(omni, ingest, blocks_before)
    ahead = ingest.ahead_positions // BLOCK_SIZE
    assert ahead > one.prompt_tokens // BLOCK_SIZE and talker.num_ahead_tokens > ahead_before
    cached_before = talker.num_cached_tokens
    second = (*history, Message("user", (Audio(samples),)))
    request = OmniRequest("ta2", second, Sampling(max_tokens=8), SPEECH, session=session)
    events = await asyncio.wait_for(collect(omni.generate(request, ingest)), TIMEOUT)
    assert ingest.fallback is None and isinstance(events[-1], Finished)
    assert talker.num_cached_tokens - cached_before == ahead * BLOCK_SIZE  # the answer computed only the rest
    waveform = np.concatenate([e.samples for e in events if isinstance(e, AudioDelta)])
    alone_usage, alone = await speak(omni, "ta2-alone", second, None)
    assert events[-1].usage.audio_tokens == alone_usage.audio_tokens > 0 and len(waveform) == len(alone)
    assert np.abs(waveform - alone).max() <= 1e-5 * max(np.abs(alone).max(), 1e-30) + 1e-7
    omni.forget_session(session)
    assert await cached_blocks_settle_at(omni, blocks_before)
    assert talker.num_free_tokens == talker.blocks.num_tokens


async def collect(stream) -> list:
    return [event async for event in stream]


async def blocks_ahead_settle(omni: OmniEngine, ingest, blocks_before: int) -> bool:
    """Polled: every full block of what the ingest handed the talker is cached (the first turn's or prefilled ahead)."""
    for _ in range(200):
        passed_on = ingest.ahead_positions // BLOCK_SIZE
        if passed_on and omni.speech.talker.blocks.num_cached_blocks == blocks_before + passed_on:
            return True
        await asyncio.sleep(0.05)
    return False
