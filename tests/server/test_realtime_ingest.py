"""Streaming input on the Realtime path: a user turn is prefilled while it is spoken (setting `ingest_audio`), is
answered from the ingest session, says what the same turn says with ingestion off, and leaves nothing open when
the turn ends without an answer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from live import live_server, settled
from realtime_client import chunks, raw, silence, speech

from omnitalk.engine import media
from omnitalk.engine.thinker.features import BLOCK_SAMPLES, LOOKAHEAD
from omnitalk.server.realtime.input_audio import Resampled
from omnitalk.server.realtime.protocol import SAMPLE_RATE

GREEDY = {"type": "realtime", "temperature": 0.0, "max_output_tokens": 8}
MANUAL = {**GREEDY, "audio": {"input": {"turn_detection": None}}}


def test_the_stream_resampled_in_pieces_is_the_buffer_resampled_at_once():
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(SAMPLE_RATE * 7) * 8000).clip(-32768, 32767).astype("<i2")
    audio, start = Resampled(), 0
    while start < len(pcm):
        size = int(rng.integers(1, 4000))
        audio.push(pcm[start : start + size].tobytes())
        start += size
    audio.flush()
    at_once = media.load_audio(pcm.tobytes(), format=media.PCM16, sample_rate=SAMPLE_RATE)
    assert np.array_equal(audio.slice(0, audio.produced), at_once)


def answers(state) -> tuple[float, float, float]:
    m = state.metrics
    return (
        m.ingested_turns.labels("session")._value.get(),
        m.ingested_turns.labels("fallback")._value.get(),
        m.ingested_blocks._value.get(),
    )


async def send(ws, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


async def append(ws, samples: np.ndarray) -> None:
    for chunk in chunks(samples):
        await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})


async def manual_turn(url: str, samples: np.ndarray) -> str:
    async with raw(url) as (ws, events):
        await send(ws, {"type": "session.update", "session": MANUAL})
        await events.until("session.updated")
        await append(ws, samples)
        await send(ws, {"type": "input_audio_buffer.commit"})
        await events.until("conversation.item.done")
        await send(ws, {"type": "response.create"})
        done = (await events.until("response.done"))[-1]
        return done["response"]["output"][0]["content"][0]["transcript"]


async def vad_turn(url: str, samples: np.ndarray) -> str:
    async with raw(url) as (ws, events):
        await send(ws, {"type": "session.update", "session": GREEDY})
        await events.until("session.updated")
        await append(ws, samples)
        done = (await events.until("response.done"))[-1]
        return done["response"]["output"][0]["content"][0]["transcript"]


def fading(seconds: float) -> np.ndarray:
    """Speech that grows quieter: its loudest log-mel value is in the first 2 s block, so no later block moves
    the clamp of the blocks prefilled before it (`ThinkerIngest` falls back when one does; plain `speech` does)."""
    samples = speech(seconds)
    return samples * np.linspace(1.0, 0.5, len(samples), dtype=np.float32)


@pytest.fixture(scope="module")
def utterances() -> dict[str, np.ndarray]:
    return {
        "manual": fading(7.0),
        "vad": np.concatenate([silence(0.6), fading(4.5), silence(0.8)]),
    }


@pytest.mark.parametrize("kind", ["manual", "vad"])
async def test_a_spoken_turn_is_answered_from_its_ingest_session(server, omni, settings, utterances, kind):
    url, state = server
    turn = manual_turn if kind == "manual" else vad_turn
    session, fallback, blocks = answers(state)
    ingested = await turn(url, utterances[kind])
    after = answers(state)
    assert after[:2] == (session + 1, fallback)  # answered from the session, not the conversation sent at once
    assert after[2] >= blocks
    off = settings.model_copy(update={"ingest_audio": False})
    async with live_server(omni, off) as (off_url, off_state):
        sent_at_once = await turn(off_url, utterances[kind])
        assert answers(off_state) == (0, 0, 0)
    assert ingested == sent_at_once and ingested


async def held(state, blocks: int) -> int:
    """Waits until the open ingest sessions hold `blocks` blocks prefilled (the engine's own reports, through the
    server's gauge); returns how many they hold."""
    gauge = state.metrics.ingest_prefilled
    for _ in range(2400):
        if gauge._value.get() >= blocks:
            break
        await asyncio.sleep(0.05)
    return gauge._value.get()


async def test_every_complete_block_of_a_30s_utterance_is_prefilled_before_it_is_committed(server):
    """30.1 s of speech (15 complete 2 s blocks) appended 100 ms at a time, waiting between appends for the blocks
    the audio so far completes (a 16 kHz sample of margin per 100 for the resampler's delay); its loudest block is
    not its first, so the session is restarted on the way. At the commit every block is prefilled, and the turn
    is answered from the session with all 15, none sent at once."""
    url, state = server
    samples = speech(30.1)
    before, restarts = answers(state), state.metrics.ingest_restarts._value.get()
    async with raw(url) as (ws, events):
        await send(ws, {"type": "session.update", "session": MANUAL})
        await events.until("session.updated")
        sent = 0
        for chunk in chunks(samples):
            await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
            sent += len(chunk) * 3 // 4 // 2  # base64 of pcm16
            received = sent * 2 // 3 * 99 // 100
            await held(state, max(0, received - LOOKAHEAD) // BLOCK_SAMPLES)
        assert await held(state, 15) == 15  # before the commit is sent
        await send(ws, {"type": "input_audio_buffer.commit"})
        await events.until("conversation.item.done")
        await send(ws, {"type": "response.create"})
        done = (await events.until("response.done"))[-1]
        assert done["response"]["output"][0]["content"][0]["transcript"]
    assert answers(state) == (before[0] + 1, before[1], before[2] + 15)
    assert state.metrics.ingest_restarts._value.get() > restarts
    assert await settled(state) and state.metrics.ingest_prefilled._value.get() == 0


async def opened(ws, events, state) -> None:
    """Every event sent so far is handled (they are in order) and the turn's ingest is open."""
    await send(ws, {"type": "conversation.item.retrieve", "item_id": "none"})
    await events.until("error")
    assert state.engine.thinker.num_open_streams == 1


async def prefilled_ahead(state, before: int) -> bool:
    """Polled: the talker has prefilled positions ahead since `before` (`Talker.num_ahead_tokens`)."""
    for _ in range(400):
        if state.engine.speech.talker.num_ahead_tokens > before:
            return True
        await asyncio.sleep(0.05)
    return False


async def talker_released(state, events, cached: int = 0) -> bool:
    """Polled: no talker block is held or reserved (whatever was prefilled ahead, and every stream, let go), and
    `cached` blocks are cached for the session of `events` (its prompt blocks, free to evict)."""
    talker, session = state.engine.speech.talker, events.seen[0]["session"]["id"]
    for _ in range(400):
        if talker.num_free_tokens == talker.blocks.num_tokens and talker.blocks.num_session_blocks(session) == cached:
            return True
        await asyncio.sleep(0.05)
    return False


def session_blocks(state, events) -> int:
    return state.engine.speech.talker.blocks.num_session_blocks(events.seen[0]["session"]["id"])


async def manual_ingest(ws, events, state) -> None:
    """Manual turns; 2.5 s of speech appended and ingested."""
    await send(ws, {"type": "session.update", "session": MANUAL})
    await events.until("session.updated")
    await append(ws, speech(2.5))
    await ingest_opened(ws, events, state)


async def ingest_opened(ws, events, state) -> None:
    """The turn's ingest is open and the talker has prefilled some of its prompt ahead."""
    ahead = state.engine.speech.talker.num_ahead_tokens
    await opened(ws, events, state)
    assert await prefilled_ahead(state, ahead)


async def test_clear_cancel_a_reset_detector_and_leaving_mid_utterance_leave_nothing_open(server):
    """Every stage lets the turn go: the thinker's requests, and the talker's blocks, which it prefilled ahead while
    the turn was spoken. Those stay cached for the session, held by nothing, until the session ends."""
    url, state = server
    async with raw(url) as (ws, events):
        await manual_ingest(ws, events, state)
        await send(ws, {"type": "input_audio_buffer.clear"})
        await events.until("input_audio_buffer.cleared")
        assert await settled(state)
        cached = session_blocks(state, events)
        assert cached > 0 and await talker_released(state, events, cached)

        await append(ws, speech(2.5) * 0.5)  # other audio: blocks not cached yet
        await ingest_opened(ws, events, state)
        await send(ws, {"type": "input_audio_buffer.commit"})
        await events.until("conversation.item.done")
        await send(ws, {"type": "response.create", "response": {"max_output_tokens": 200}})
        await events.until("response.created")
        await send(ws, {"type": "response.cancel"})
        assert (await events.until("response.done"))[-1]["response"]["status"] == "cancelled"
        assert await settled(state)
        assert await talker_released(state, events, session_blocks(state, events))
    assert await talker_released(state, events)  # the session ended: its cached blocks went with it

    # A new session: a later turn of one with session_state on is not ingested (it reuses the session's state).
    async with raw(url) as (ws, events):
        await manual_ingest(ws, events, state)
    assert await settled(state)  # the client left mid-utterance
    assert await talker_released(state, events)

    async with raw(url) as (ws, events):  # server VAD: a turn started, then the detector is replaced
        await append(ws, np.concatenate([silence(0.5), speech(2.0)]))
        await events.until("input_audio_buffer.speech_started")
        await ingest_opened(ws, events, state)
        await send(ws, {"type": "session.update", "session": MANUAL})
        await events.until("session.updated")
        assert await settled(state)
        assert await talker_released(state, events, session_blocks(state, events))
    assert await talker_released(state, events)


async def test_a_response_cancelled_before_it_starts_closes_the_turn_it_answers(server):
    """response.create and response.cancel in one burst: the cancel can reach the response before its task first
    runs; the ingested turn it was handed is closed all the same."""
    url, state = server
    async with raw(url) as (ws, events):
        await manual_ingest(ws, events, state)
        await send(ws, {"type": "input_audio_buffer.commit"})
        await events.until("conversation.item.done")
        await send(ws, {"type": "response.create"})
        await send(ws, {"type": "response.cancel"})
        assert (await events.until("response.done"))[-1]["response"]["status"] == "cancelled"
        assert await settled(state)
        assert await talker_released(state, events, session_blocks(state, events))
    assert await talker_released(state, events)


async def test_a_barge_in_and_a_false_start_leave_the_talker_nothing_held(server):
    """Server VAD: the user speaks over an answer (the answer is cancelled, the new turn ingested and prefilled
    ahead), and leaves before the turn ends (speech_started, no commit). Nothing stays held or cached."""
    url, state = server
    talker = state.engine.speech.talker
    async with raw(url) as (ws, events):
        vad = {"type": "server_vad", "create_response": False, "interrupt_response": True}
        await send(ws, {"type": "session.update", "session": {**GREEDY, "audio": {"input": {"turn_detection": vad}}}})
        await events.until("session.updated")
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}
        await send(ws, {"type": "conversation.item.create", "item": item})
        await send(ws, {"type": "response.create", "response": {"max_output_tokens": 200}})
        await events.until("response.created")
        ahead = talker.num_ahead_tokens
        await append(ws, speech(2.5))  # no silence after it: the turn never ends
        done = (await events.until("response.done"))[-1]["response"]
        assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        await opened(ws, events, state)
        assert await prefilled_ahead(state, ahead)
        assert await talker_released(state, events, session_blocks(state, events))
    assert await settled(state)
    assert await talker_released(state, events)
