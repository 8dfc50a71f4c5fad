"""Hour-long Realtime sessions on the real server: truncation keeps a session answering once its conversation
outgrows the context window, and a session ends at its maximum duration as OpenAI's does."""

from __future__ import annotations

import json

import websockets
from realtime_client import MANUAL, realtime

WINDOW = 400  # tokens per response (prompt + answer): small, so that a few turns fill it
TEXT = {**MANUAL, "output_modalities": ["text"], "instructions": "Answer in one word."}


def said(n: int) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"Turn {n}: go on, please."}]}


async def test_a_hundred_turns_keep_answering_as_the_oldest_items_are_dropped(server):
    url, state = server
    window = state.settings.realtime_context_tokens
    state.settings.realtime_context_tokens = WINDOW
    try:
        async with realtime(url) as (conn, events):
            await conn.session.update(session=TEXT)
            assert (await events.until("session.updated"))[-1]["session"]["truncation"] == "auto"
            prompts = []
            for n in range(100):
                await conn.conversation.item.create(item=said(n))
                await events.until("conversation.item.done")
                await conn.response.create(response={"max_output_tokens": 2})
                done = (await events.until("response.done"))[-1]["response"]
                assert done["status"] in ("completed", "incomplete"), done
                prompts.append(done["usage"]["input_tokens"])
            assert max(prompts) <= WINDOW - 2  # 200 items would take far more: the oldest were left out
            await conn.conversation.item.retrieve(item_id=events.seen[2]["item"]["id"])
            first = (await events.until("conversation.item.retrieved"))[-1]["item"]
            assert first["content"][0]["text"] == "Turn 0: go on, please."  # left out of the prompt, not deleted

            await conn.session.update(session={"type": "realtime", "truncation": "disabled"})
            assert (await events.until("session.updated"))[-1]["session"]["truncation"] == "disabled"
            await conn.response.create(response={"max_output_tokens": 2})
            error = await events.error()
            assert error["code"] == "context_length_exceeded"  # nothing dropped: the conversation no longer fits

            ratio = {"type": "retention_ratio", "retention_ratio": 0.5}
            await conn.session.update(session={"type": "realtime", "truncation": ratio})
            assert (await events.until("session.updated"))[-1]["session"]["truncation"] == ratio
            await conn.response.create(response={"max_output_tokens": 2})
            done = (await events.until("response.done"))[-1]["response"]
            assert done["usage"]["input_tokens"] <= max(prompts) // 2 + 40  # half the room, and the instructions
    finally:
        state.settings.realtime_context_tokens = window


async def test_a_session_ends_at_its_maximum_duration(server):
    url, state = server
    lifetime = state.settings.realtime_max_session_s
    state.settings.realtime_max_session_s = 1.5
    try:
        async with websockets.connect(url.replace("http://", "ws://") + "/v1/realtime") as ws:
            await ws.recv()  # session.created
            frames = [message async for message in ws]  # until the server closes
            assert ws.close_code == 1000
    finally:
        state.settings.realtime_max_session_s = lifetime
    assert '"code": "session_expired"' in frames[-1] and "maximum duration of 0.025 minutes" in frames[-1]


async def test_an_idle_session_is_closed_when_the_setting_asks(server):
    url, state = server
    assert state.settings.realtime_idle_timeout_s is None  # OpenAI's: no idle limit
    state.settings.realtime_idle_timeout_s = 1.0
    try:
        async with websockets.connect(url.replace("http://", "ws://") + "/v1/realtime") as ws:
            await ws.recv()  # session.created
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
            frames = [message async for message in ws]  # until the server closes
            assert ws.close_code == 1000
    finally:
        state.settings.realtime_idle_timeout_s = None
    assert '"type": "session.updated"' in frames[0]
    assert '"code": "session_idle"' in frames[-1] and "idle for 1 seconds" in frames[-1]
