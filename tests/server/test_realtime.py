"""WebSocket /v1/realtime on the real server, driven by the openai SDK's Realtime client (and raw frames);
the client and the synthetic speech are in tests/realtime_client.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import numpy as np
import pytest
import websockets
from PIL import Image
from realtime_client import (
    MANUAL,
    MODEL,
    RATE,
    chunks,
    of,
    pcm16,
    raw,
    realtime,
    send_audio,
    silence,
    speech,
)

from omnitalk.server.metrics import Metrics
from omnitalk.server.realtime.outbox import Outbox
from omnitalk.server.realtime.vad import SpeechStarted, SpeechStopped, TurnDetector
from omnitalk.server.speech import talker_max_codes


async def test_session_created_then_updated(server):
    url, _ = server
    async with realtime(url) as (conn, events):
        session = events.seen[0]["session"]
        assert session["type"] == "realtime" and session["model"] == MODEL
        assert session["output_modalities"] == ["audio"]
        assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # on by default, as OpenAI
        assert session["instructions"].startswith("You are Qwen, a virtual human")
        assert session["max_output_tokens"] == "inf"
        await conn.session.update(
            session={
                "type": "realtime",
                "instructions": "Answer briefly.",
                "max_output_tokens": 16,
                "audio": {"input": {"turn_detection": None}, "output": {"voice": "ash"}},
            }
        )
        updated = (await events.until("session.updated"))[-1]["session"]
        assert updated["instructions"] == "Answer briefly." and updated["max_output_tokens"] == 16
        assert updated["audio"]["input"]["turn_detection"] is None
        assert updated["audio"]["output"]["voice"] == "ash"  # OpenAI's name echoed; Ethan speaks
        await conn.session.update(session={"type": "realtime", "audio": {"output": {"voice": "CHELSIE"}}})
        updated = (await events.until("session.updated"))[-1]["session"]
        assert updated["audio"]["output"]["voice"] == "CHELSIE"
        assert updated["instructions"] == "Answer briefly."  # fields left out keep their values
        # What pipecat and livekit send: accepted (and echoed) though this server has no use for some of it.
        framework = {
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {"model": "gpt-4o-transcribe"},
                    "noise_reduction": {"type": "near_field"},
                    "turn_detection": {"type": "semantic_vad", "eagerness": "high"},
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0},
            },
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
        }
        await conn.session.update(session=framework)
        updated = (await events.until("session.updated"))[-1]["session"]
        assert updated["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
        assert updated["audio"]["input"]["transcription"] == {"model": "gpt-4o-transcribe"}
        assert updated["tool_choice"] == "auto" and updated["max_output_tokens"] == "inf"


async def test_spoken_turns_truncation_and_growing_context(server):
    url, state = server
    async with realtime(url) as (conn, events):
        await conn.session.update(session=MANUAL)
        await events.until("session.updated")
        await send_audio(conn, speech(1.0))
        await conn.input_audio_buffer.commit()
        committed, added, done = await events.until("conversation.item.done")
        assert committed["type"] == "input_audio_buffer.committed" and committed["previous_item_id"] is None
        user = added["item"]
        assert added["type"] == "conversation.item.added" and user["id"] == committed["item_id"]
        assert user["role"] == "user" and user["content"][0]["type"] == "input_audio"
        assert done["item"]["id"] == user["id"]

        await conn.response.create(response={"metadata": {"client_event_id": "ev-1"}, "max_output_tokens": 8})
        turn = await events.until("response.done")
        kinds = [e["type"] for e in turn]
        created = turn[0]
        assert created["type"] == "response.created"
        assert created["response"]["metadata"] == {"client_event_id": "ev-1"}  # livekit waits for this echo
        assert created["response"]["status"] == "in_progress" and created["response"]["object"] == "realtime.response"
        assert kinds[1:4] == ["response.output_item.added", "conversation.item.added", "response.content_part.added"]
        item = turn[1]["item"]
        assert item["type"] == "message" and item["role"] == "assistant"
        assert turn[3]["part"]["type"] == "audio" and turn[3]["part"]["transcript"] == ""
        deltas = [e for e in turn if e["type"].endswith(".delta")]
        assert {e["item_id"] for e in deltas} == {item["id"]}
        assert {e["response_id"] for e in deltas} == {created["response"]["id"]}
        audio = b"".join(base64.b64decode(e["delta"]) for e in of(turn, "response.output_audio.delta"))
        assert audio and len(audio) % 2 == 0
        assert max(len(base64.b64decode(e["delta"])) for e in of(turn, "response.output_audio.delta")) <= 4800
        transcript = "".join(e["delta"] for e in of(turn, "response.output_audio_transcript.delta"))
        assert not of(turn, "response.output_text.delta")
        closing = [k for k in kinds if k.endswith(".done")]
        assert closing == [
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
        assert of(turn, "response.output_audio_transcript.done")[0]["transcript"] == transcript
        response = turn[-1]["response"]
        # The random model never says eos: it stops at max_output_tokens, which OpenAI calls incomplete.
        assert response["status"] in ("completed", "incomplete")
        if response["status"] == "incomplete":
            assert response["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
        content = response["output"][0]["content"]
        assert content == [{"type": "output_audio", "transcript": transcript}]  # no audio bytes
        usage = response["usage"]
        assert usage["output_token_details"]["audio_tokens"] > 0 and usage["output_token_details"]["text_tokens"] > 0
        assert usage["input_token_details"]["audio_tokens"] > 0  # the user's second of speech: 25 tokens
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        # The tiny talker never ends on its own: 8 text tokens bound its codes (50 per second).
        cap = talker_max_codes(8)
        assert usage["output_token_details"]["audio_tokens"] <= cap and len(audio) / 2 / RATE <= cap / 50 + 0.1
        audio_ms = len(audio) / 2 / RATE * 1000
        assert state.limiter.active == 0

        # Truncation: beyond the audio is refused; half of it keeps about half of the transcript.
        await conn.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=int(audio_ms) + 50)
        assert (await events.error())["param"] == "audio_end_ms"
        await conn.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=int(audio_ms / 2))
        truncated = (await events.until("conversation.item.truncated"))[-1]
        assert truncated["item_id"] == item["id"] and truncated["audio_end_ms"] == int(audio_ms / 2)
        await conn.conversation.item.retrieve(item_id=item["id"])
        kept = (await events.until("conversation.item.retrieved"))[-1]["item"]["content"][0]["transcript"]
        assert transcript.startswith(kept) and abs(len(kept) - len(transcript) / 2) <= 1

        # The next turn (text in, text out) reads the whole conversation: its prompt is longer.
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And then?"}]}
        )
        added = (await events.until("conversation.item.done"))[-1]
        assert added["previous_item_id"] == item["id"]
        await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 4})
        turn = await events.until("response.done")
        assert of(turn, "response.content_part.added")[0]["part"]["type"] == "text"
        assert not of(turn, "response.output_audio.delta")
        text = "".join(e["delta"] for e in of(turn, "response.output_text.delta"))
        assert of(turn, "response.output_text.done")[0]["text"] == text
        second = turn[-1]["response"]
        assert second["output"][0]["content"] == [{"type": "output_text", "text": text}]
        assert second["usage"]["input_tokens"] > usage["input_tokens"] + 3
        assert second["usage"]["output_token_details"]["audio_tokens"] == 0


async def test_server_vad_detects_a_turn_and_answers(server):
    url, _ = server
    async with realtime(url) as (conn, events):
        turn_detection = {"type": "server_vad", "silence_duration_ms": 300, "prefix_padding_ms": 200}
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": turn_detection}}})
        await events.until("session.updated")
        await send_audio(conn, np.concatenate([silence(0.6), speech(1.2), silence(0.8)]))
        got = await events.until("response.created")
        kinds = [e["type"] for e in got]
        assert kinds == [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
            "response.created",
        ]
        started, stopped, committed = got[:3]
        assert 300 <= started["audio_start_ms"] <= 500  # speech at 600 ms, 200 ms of padding before it
        assert 1800 <= stopped["audio_end_ms"] <= 2400  # speech ends at 1800 ms, then 300 ms of silence
        assert started["item_id"] == stopped["item_id"] == committed["item_id"]
        await conn.response.cancel()
        done = (await events.until("response.done"))[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}


async def test_barge_in_cancels_the_live_response(server):
    url, state = server
    async with realtime(url) as (conn, events):
        turn_detection = {"type": "server_vad", "create_response": False, "interrupt_response": True}
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": turn_detection}}})
        await events.until("session.updated")
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}
        )
        await conn.response.create(response={"max_output_tokens": 64})
        response_id = (await events.until("response.created"))[-1]["response"]["id"]
        await send_audio(conn, speech(0.5))
        got = await events.until("response.done")
        assert of(got, "input_audio_buffer.speech_started")
        done = got[-1]["response"]
        assert done["id"] == response_id and done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        assert done["output"][0]["status"] == "incomplete"
        assert state.limiter.active == 0


async def test_bad_input_is_an_error_event_and_the_session_lives_on(server):
    url, state = server
    async with raw(url) as (ws, events):

        async def refused(message: str | dict) -> dict[str, Any]:
            await ws.send(message if isinstance(message, str) else json.dumps(message))
            return await events.error()

        error = await refused("{not json")
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"
        error = await refused({"type": "response.dance", "event_id": "ev-7"})
        assert error["code"] == "invalid_event_type" and error["event_id"] == "ev-7"
        error = await refused({"type": "response.text.delta"})  # a beta name is no GA event either
        assert error["code"] == "invalid_event_type"
        error = await refused({"type": "input_audio_buffer.append", "event_id": "ev-8"})
        assert error["code"] == "missing_required_parameter" and error["param"] == "audio"
        assert error["event_id"] == "ev-8"
        error = await refused({"type": "input_audio_buffer.append", "audio": "%%%not base64"})
        assert error["param"] == "audio" and "base64" in error["message"]
        error = await refused({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()})
        assert "16-bit" in error["message"]
        for fmt in ({"type": "audio/pcm", "rate": 16000}, {"type": "audio/pcmu"}):
            update = {"type": "realtime", "audio": {"input": {"format": fmt}}}
            error = await refused({"type": "session.update", "session": update})
            assert error["param"] == "session.audio.input.format" and "audio/pcm" in error["message"]
        error = await refused({"type": "session.update", "session": {"type": "realtime", "voices": "x"}})
        assert error["code"] == "unknown_parameter"
        update = {"type": "realtime", "audio": {"output": {"voice": "nova-9"}}}
        error = await refused({"type": "session.update", "session": update})
        assert "Chelsie" in error["message"] and "Ethan" in error["message"]
        error = await refused({"type": "input_audio_buffer.commit"})
        assert error["code"] == "input_audio_buffer_commit_empty"
        error = await refused({"type": "response.cancel"})
        assert error["code"] == "response_cancel_not_active"
        assert error["message"] == "Cancellation failed: no active response found"  # livekit ignores only this
        error = await refused({"type": "conversation.item.delete", "item_id": "item_nope"})
        assert error["code"] == "item_delete_invalid_item_id"
        error = await refused({"type": "conversation.item.retrieve", "item_id": "item_nope"})
        assert error["code"] == "item_retrieve_invalid_item_id"  # pipecat's receive loop survives only this code

        limit = state.settings.max_message_bytes
        state.settings.max_message_bytes = 64 * 1024  # our own limit, below uvicorn's frame limit
        try:
            big = {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(96 * 1024)).decode()}
            error = await refused(big)
        finally:
            state.settings.max_message_bytes = limit
        assert error["code"] == "message_too_large"

        taken = state.limiter.active
        state.limiter.active = state.limiter.limit  # every stream taken
        try:
            error = await refused({"type": "response.create"})
        finally:
            state.limiter.active = taken
        assert error["code"] == "rate_limit_exceeded" and "retry" in error["message"]

        # Still usable: items come and go, and a response runs; a second response.create meanwhile is refused.
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunks(speech(0.2))[0]}))
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        await events.until("input_audio_buffer.cleared")
        clip = {"type": "input_audio", "audio": base64.b64encode(pcm16(speech(0.5))).decode()}
        user = {"type": "message", "role": "user", "content": [clip], "id": "item_clip"}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user}))
        added = (await events.until("conversation.item.added"))[-1]["item"]
        assert added["id"] == "item_clip" and added["content"] == [{"type": "input_audio", "transcript": None}]
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user}))
        assert (await events.error())["code"] == "item_id_taken"
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": "item_clip"}))
        assert (await events.until("conversation.item.deleted"))[-1]["item_id"] == "item_clip"
        png = io.BytesIO()
        Image.new("RGB", (56, 56), (200, 30, 30)).save(png, format="PNG")
        url_png = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        picture = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": url_png}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": picture}))
        assert (await events.until("conversation.item.added"))[-1]["item"]["content"] == [{"type": "input_image"}]
        text = {"type": "input_text", "text": "Hello"}
        await ws.send(
            json.dumps(
                {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [text]}}
            )
        )
        await ws.send(
            json.dumps({"type": "response.create", "response": {"output_modalities": ["text"], "max_output_tokens": 4}})
        )
        await ws.send(json.dumps({"type": "response.create", "event_id": "ev-9"}))
        got = await events.until("response.done")
        errors = of(got, "error")
        assert [e["error"]["code"] for e in errors] == ["conversation_already_has_active_response"]
        assert errors[0]["error"]["event_id"] == "ev-9"
        assert got[-1]["response"]["status"] in ("completed", "incomplete")
        whole = got[-1]["response"]["usage"]["input_tokens"]

        # A response outside the conversation, on a context of its own (the "Hello" alone): nothing joins it.
        hello = of(got, "conversation.item.added")[0]["item"]["id"]
        aside = {"conversation": "none", "input": [{"type": "item_reference", "id": hello}], "max_output_tokens": 2}
        await ws.send(json.dumps({"type": "response.create", "response": {**aside, "output_modalities": ["text"]}}))
        got = await events.until("response.done")
        assert not of(got, "conversation.item.added") and got[-1]["response"]["conversation_id"] is None
        assert got[-1]["response"]["usage"]["input_tokens"] < whole  # without the picture


async def test_a_client_that_leaves_cancels_its_response(server):
    url, state = server
    async with realtime(url) as (conn, events):
        await conn.session.update(session=MANUAL)
        await events.until("session.updated")
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Go on."}]}
        )
        await conn.response.create(response={"max_output_tokens": 64})
        await events.until("response.output_audio_transcript.delta")
        assert state.limiter.active == 1
    engine = state.engine
    for _ in range(200):  # every stage lets go: the stream slot, the thinker's request, the talker's stream
        if state.limiter.active == 0 and engine.thinker.num_open_streams == 0 and engine.speech.num_streams == 0:
            break
        await asyncio.sleep(0.05)
    assert state.limiter.active == 0 and engine.thinker.num_open_streams == 0 and engine.speech.num_streams == 0


async def test_a_client_too_slow_for_its_queue_is_disconnected(server):
    url, state = server
    size = state.settings.max_queued_bytes
    state.settings.max_queued_bytes = 5_000  # above any event but an audio delta (100 ms: 6.4 kB of base64)
    try:
        async with raw(url) as (ws, events):
            await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 64}}))
            with pytest.raises(websockets.ConnectionClosedError) as closed:
                await events.until("response.done")
            assert closed.value.rcvd.code == 1008
    finally:
        state.settings.max_queued_bytes = size
    for _ in range(200):
        if state.limiter.active == 0 and state.engine.speech.num_streams == 0:
            break
        await asyncio.sleep(0.05)
    assert state.limiter.active == 0 and state.engine.speech.num_streams == 0


# No engine needed below.


def test_server_vad_on_a_synthetic_utterance():
    vad = TurnDetector(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
    found = []
    for chunk in chunks(np.concatenate([silence(1.0), speech(1.5), silence(1.0)])):
        found += vad.push(base64.b64decode(chunk))
    assert [type(f) for f in found] == [SpeechStarted, SpeechStopped]
    assert 600 <= found[0].audio_start_ms <= 800  # 1000 ms, less 300 ms of padding, less a window
    assert 3000 <= found[1].audio_end_ms <= 3300  # 2500 ms of speech, then 500 ms of silence


def test_pure_silence_and_a_hum_are_not_speech():
    t = np.arange(2 * RATE) / RATE
    hum = (0.3 * np.sin(2 * np.pi * 50 * t)).astype(np.float32)
    vad = TurnDetector()
    for chunk in chunks(np.concatenate([silence(1.0), hum])):
        assert vad.push(base64.b64decode(chunk)) == []


class _StuckSocket:
    async def send_text(self, text: str) -> None:
        await asyncio.Event().wait()  # a client that never reads


async def test_a_client_behind_real_time_is_disconnected_instead_of_stalling():
    metrics = Metrics()
    outbox = Outbox(_StuckSocket(), metrics, max_bytes=10**9, max_lag_s=0.05)  # type: ignore[arg-type]
    writer = outbox.start()
    for i in range(10_000):  # a bound, not a timing: the stuck client falls behind as time passes
        outbox.send({"type": "response.output_audio.delta", "n": i}, "resp_1", audio_s=0.1)  # never blocks
        if outbox.overflowed:
            break
        await asyncio.sleep(0.001)
    assert outbox.overflowed and metrics.slow_clients._value.get() == 1
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert metrics.queue_depth._value.get() == 0 and metrics.queued_bytes._value.get() == 0


class _PlayingSocket:
    """A client that takes audio a little faster than real time (a player filling its buffer), the engine far ahead."""

    async def send_text(self, text: str) -> None:
        await asyncio.sleep(0.005 if "delta" in text else 0)


async def test_a_client_at_real_time_is_kept_while_the_engine_runs_ahead():
    metrics = Metrics()
    outbox = Outbox(_PlayingSocket(), metrics, max_bytes=10**9, max_lag_s=0.5)  # type: ignore[arg-type]
    outbox.start()
    for i in range(100):  # 100 deltas of 10 ms queued at once: 1 s of audio, far ahead of real time
        outbox.send({"type": "response.output_audio.delta", "n": i}, "resp_1", audio_s=0.01)
    while not outbox.queue.empty():
        await asyncio.sleep(0.01)
    assert not outbox.overflowed


async def test_the_outbox_is_bounded_in_bytes():
    outbox = Outbox(_StuckSocket(), Metrics(), max_bytes=1_000, max_lag_s=60)  # type: ignore[arg-type]
    outbox.start()
    for i in range(100):
        outbox.send({"type": "response.output_text.delta", "delta": "x" * 50, "n": i})
    assert outbox.overflowed and outbox.queued_bytes <= 1_000
