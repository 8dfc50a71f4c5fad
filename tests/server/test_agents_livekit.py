"""livekit-agents' own OpenAI Realtime client (livekit.plugins.openai's RealtimeModel and its RealtimeSession)
against the live server, with no room: a spoken reply, a barge-in through server VAD with no error logged, a tool
call round trip forced with tool_choice, and the user's transcript in the session's chat context."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import numpy as np
from livekit import rtc
from livekit.agents import llm
from livekit.plugins.openai.realtime import RealtimeModel, RealtimeSession
from openai.types.realtime import AudioTranscription
from openai.types.realtime.realtime_audio_input_turn_detection import ServerVad
from realtime_client import MODEL, RATE, silence, speech


@llm.function_tool
async def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather in a city."""
    return "clear"


@asynccontextmanager
async def livekit_session(url: str, *, vad: bool) -> AsyncIterator[RealtimeSession]:
    model = RealtimeModel(
        model=MODEL,
        base_url=url + "/v1",
        api_key="unused",
        voice="Chelsie",
        input_audio_transcription=AudioTranscription(model="whisper-1"),
        turn_detection=ServerVad(type="server_vad", create_response=True, interrupt_response=True),
    )
    session = model.session(turn_detection_disabled=not vad)
    session.update_options(max_response_output_tokens=6)
    try:
        yield session
    finally:
        await session.aclose()
        await model.aclose()


def frame(samples: np.ndarray) -> rtc.AudioFrame:
    data = (samples * 32767).astype(np.int16)
    return rtc.AudioFrame(data.tobytes(), RATE, 1, len(data))


async def spoken(generation: llm.GenerationCreatedEvent) -> tuple[list[rtc.AudioFrame], str]:
    """The reply's audio frames and its transcript."""
    frames, text = [], ""
    async for message in generation.message_stream:
        audio = [f async for f in message.audio_stream]
        text += "".join([t async for t in message.text_stream])
        frames += audio
    return frames, text


def errors(caplog) -> list[str]:
    """Errors logged, but for livekit's own report of a reply cut at the test's small max_output_tokens (OpenAI's
    `incomplete` status, which livekit raises into a future nobody awaits without an AgentSession)."""
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return [m for m in logged if "response incomplete: max_output_tokens" not in m]


async def test_a_spoken_reply(server, caplog):
    url, _ = server
    async with livekit_session(url, vad=False) as session:
        generation = await session.generate_reply(instructions="Say hello.")
        frames, _ = await asyncio.wait_for(spoken(generation), 300)
        assert frames and all(f.sample_rate == RATE and f.num_channels == 1 for f in frames)
        assert sum(f.samples_per_channel for f in frames) > 0
        assert [i.role for i in session.chat_ctx.items if i.type == "message"] == ["assistant"]
    assert errors(caplog) == []


async def test_a_barge_in_is_clean_and_the_users_words_reach_the_chat_context(server, caplog):
    url, _ = server
    async with livekit_session(url, vad=True) as session:
        transcribed: asyncio.Future[llm.InputTranscriptionCompleted] = asyncio.Future()
        created: asyncio.Queue[llm.GenerationCreatedEvent] = asyncio.Queue()
        session.on("input_speech_started", lambda _: session.interrupt())  # what livekit's AgentActivity does
        session.on("input_audio_transcription_completed", lambda e: e.is_final and transcribed.set_result(e))
        session.on("generation_created", created.put_nowait)
        session.update_options(max_response_output_tokens=40)
        first = await session.generate_reply(instructions="Tell a long story.")
        message = await asyncio.wait_for(anext(aiter(first.message_stream)), 300)
        await asyncio.wait_for(anext(aiter(message.audio_stream)), 300)  # the reply is playing
        await created.get()  # (the reply just asked for)
        session.push_audio(frame(np.concatenate([speech(1.0), silence(1.0)])))  # the user talks over it
        answer = await asyncio.wait_for(created.get(), 300)  # server VAD's response to the user's turn
        await asyncio.wait_for(spoken(answer), 300)
        event = await asyncio.wait_for(transcribed, 300)  # beside the answer: before or after it
        users = [i for i in session.chat_ctx.items if i.type == "message" and i.role == "user"]
        assert [(u.id, u.text_content or "") for u in users] == [(event.item_id, event.transcript)]
    assert errors(caplog) == []


async def test_a_forced_tool_call_round_trip(server, caplog):
    url, _ = server
    async with livekit_session(url, vad=False) as session:
        await session.update_tools([get_weather])
        session.update_options(max_response_output_tokens=200)
        named: llm.ToolChoice = {"type": "function", "function": {"name": "get_weather"}}
        generation = await session.generate_reply(instructions="Weather in Rome?", tool_choice=named)
        calls = [c async for c in generation.function_stream]
        assert [m async for m in generation.message_stream] == []  # a call, nothing spoken
        [call] = calls
        assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Rome")
        context = session.chat_ctx.copy()
        output = llm.FunctionCallOutput(call_id=call.call_id, name=call.name, output='{"sky": "clear"}', is_error=False)
        context.items.append(output)
        await session.update_chat_ctx(context)
        session.update_options(max_response_output_tokens=6)
        answer = await session.generate_reply(tool_choice="none")
        frames, _ = await asyncio.wait_for(spoken(answer), 300)
        assert frames  # spoken, after the call's output
        kinds = [i.type for i in session.chat_ctx.items]
        assert kinds[-3:] == ["function_call", "function_call_output", "message"]
    assert errors(caplog) == []
