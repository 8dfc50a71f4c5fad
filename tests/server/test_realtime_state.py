"""State across Realtime turns (setting `session_state`): a session's later turns reuse its earlier ones (cached
tokens counted in usage and in `omnitalk:thinker_cached_tokens`), say what they say with the setting off, also
after a truncated answer, and the session's stored rows go when it ends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from live import live_server, settled
from realtime_client import chunks, raw, speech

MANUAL = {"type": "realtime", "temperature": 0.0, "max_output_tokens": 8, "audio": {"input": {"turn_detection": None}}}


async def send(ws, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


async def turn(ws, events, samples: np.ndarray) -> dict[str, Any]:
    """One manual turn: the audio, committed, answered; returns the response."""
    for chunk in chunks(samples):
        await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
    await send(ws, {"type": "input_audio_buffer.commit"})
    await events.until("conversation.item.done")
    await send(ws, {"type": "response.create"})
    return (await events.until("response.done"))[-1]["response"]


async def conversation(url: str) -> list[tuple[str, int]]:
    """Three turns, the second after the first answer was truncated to half of what was played; (transcript,
    cached tokens) of each answer."""
    answers = []
    async with raw(url) as (ws, events):
        await send(ws, {"type": "session.update", "session": MANUAL})
        await events.until("session.updated")
        for k, seconds in enumerate((5.0, 2.5, 3.0)):
            response = await turn(ws, events, speech(seconds) * (0.9 - 0.2 * k))
            message = response["output"][0]
            answers.append(
                (message["content"][0]["transcript"], response["usage"]["input_token_details"]["cached_tokens"])
            )
            if k == 0:
                played = response["usage"]["output_token_details"]["audio_tokens"] * 20  # ms
                cut = {"item_id": message["id"], "content_index": 0, "audio_end_ms": played // 2}
                await send(ws, {"type": "conversation.item.truncate", **cut})
                await events.until("conversation.item.truncated")
    return answers


async def forgotten(omni) -> bool:
    """The ended session's stored rows are dropped (polled: its handler ends a little after the client)."""
    for _ in range(100):
        if omni.thinker.sessions.num_bytes == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_later_turns_reuse_the_session_and_say_what_they_say_without(omni, settings):
    """Ingestion off, so that every turn is the conversation sent at once."""
    on = settings.model_copy(update={"ingest_audio": False})
    async with live_server(omni, on) as (url, state):
        reused = await conversation(url)
        assert reused[0][1] == 0 and reused[1][1] > 0 and reused[2][1] > 0
        assert state.metrics.thinker_cached_tokens._value.get() == sum(cached for _, cached in reused)
        assert await settled(state) and await forgotten(omni)
    off = on.model_copy(update={"session_state": False})
    async with live_server(omni, off) as (off_url, off_state):
        alone = await conversation(off_url)
        assert off_state.metrics.thinker_cached_tokens._value.get() == 0
    assert [text for text, _ in reused] == [text for text, _ in alone]


async def test_by_default_every_turn_is_ingested_and_reuses_the_session(omni, settings):
    """Ingestion and session state on (the defaults): every turn is prefilled while spoken under the session's salt
    and answered from its ingest session; turns 2 and 3 find the earlier turns (ingested ones included) in the
    cache, and say what they say with both settings off."""
    async with live_server(omni, settings) as (url, state):
        reused = await conversation(url)
        turns = state.metrics.ingested_turns
        assert turns.labels("session")._value.get() == 3 and turns.labels("fallback")._value.get() == 0
        assert reused[0][1] == 0 and reused[1][1] > 0 and reused[2][1] > 0
        assert state.metrics.thinker_cached_tokens._value.get() == sum(cached for _, cached in reused)
        assert await settled(state) and await forgotten(omni)
    off = settings.model_copy(update={"ingest_audio": False, "session_state": False})
    async with live_server(omni, off) as (off_url, _):
        alone = await conversation(off_url)
    assert [text for text, _ in reused] == [text for text, _ in alone]
