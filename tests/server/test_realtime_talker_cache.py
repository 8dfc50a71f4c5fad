"""A Realtime session's later turns take the talker's prompt blocks of its earlier turns from the pool (counted in
`omnitalk:talker_cached_tokens`), the blocks go when it ends, and with `session_state` off nothing is cached.
(Parity of the speech itself: tests/engine/test_talker_session.py, greedy; Realtime's talker samples.)"""

from __future__ import annotations

import asyncio
import json

import httpx
from live import live_server, settled
from realtime_client import chunks, raw, speech

MANUAL = {"type": "realtime", "temperature": 0.0, "max_output_tokens": 8, "audio": {"input": {"turn_detection": None}}}
METRIC = "omnitalk:talker_cached_tokens_total"
AHEAD = "omnitalk:talker_ahead_tokens_total"


async def send(ws, event: dict) -> None:
    await ws.send(json.dumps(event))


async def session(url: str, talker) -> tuple[str, list[int], int]:
    """Three manual turns: the session's id, the talker's cached tokens after each answer, and the blocks cached
    for the session at its end."""
    cached = []
    async with raw(url) as (ws, events):
        sid = events.seen[0]["session"]["id"]
        await send(ws, {"type": "session.update", "session": MANUAL})
        await events.until("session.updated")
        for k, seconds in enumerate((5.0, 2.5, 3.0)):
            for chunk in chunks(speech(seconds) * (0.9 - 0.2 * k)):
                await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
            await send(ws, {"type": "input_audio_buffer.commit"})
            await events.until("conversation.item.done")
            await send(ws, {"type": "response.create"})
            response = (await events.until("response.done"))[-1]["response"]
            assert response["usage"]["output_token_details"]["audio_tokens"] > 0
            cached.append(talker.num_cached_tokens)
        return sid, cached, talker.blocks.num_session_blocks(sid)


async def scraped(url: str, metric: str = METRIC) -> float:
    async with httpx.AsyncClient(base_url=url) as http:
        lines = (await http.get("/metrics")).text.splitlines()
    return float(next(line.split()[-1] for line in lines if line.startswith(metric + " ")))


async def forgotten(talker, session: str) -> bool:
    """Polled: no block is cached for the session (it ends a little after its client leaves)."""
    for _ in range(100):
        if talker.blocks.num_session_blocks(session) == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_later_turns_reuse_the_talkers_blocks_which_go_with_the_session(omni, settings):
    talker = omni.speech.talker
    on = settings.model_copy(update={"ingest_audio": False})
    start = talker.num_cached_tokens
    async with live_server(omni, on) as (url, state):
        sid, cached, blocks = await session(url, talker)
        assert cached[0] == start < cached[1] < cached[2] and blocks > 0
        assert await scraped(url) == talker.num_cached_tokens
        assert await settled(state) and await forgotten(talker, sid)
    off = on.model_copy(update={"session_state": False})
    async with live_server(omni, off) as (off_url, _):
        _, cached_off, blocks_off = await session(off_url, talker)
    assert cached_off == [cached[2]] * 3 and blocks_off == 0


async def test_with_ingestion_each_turn_is_prefilled_ahead_and_counted(omni, settings):
    """Ingested turns (the default): the talker prefills each turn's prompt blocks while it is spoken
    (`omnitalk:talker_ahead_tokens` agrees), and every block goes with the session."""
    talker = omni.speech.talker
    ahead_before = talker.num_ahead_tokens
    async with live_server(omni, settings) as (url, state):
        sid, cached, blocks = await session(url, talker)
        assert talker.num_ahead_tokens > ahead_before and cached[0] < cached[1] < cached[2] and blocks > 0
        assert await scraped(url, AHEAD) == talker.num_ahead_tokens
        assert await settled(state) and await forgotten(talker, sid)
    assert talker.num_free_tokens == talker.blocks.num_tokens
