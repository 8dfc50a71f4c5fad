"""A Realtime client for the tests: the openai SDK's connection or raw frames, every server event checked, and
synthetic speech.

Speech is synthetic: a vowel sequence (harmonics of a gliding 130 Hz voice, shaped by the first three formants of
/a/, /i/, /e/, /u/, /o/ in turn, four syllables a second). Silero VAD gives it a speech probability of 0.95-1.0
while pure harmonics without formants stay below 0.6; silence scores 0.01.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import openai
import pydantic
import websockets
from openai.types.realtime import RealtimeServerEvent

from omnitalk.server.realtime.protocol import SERVER_EVENTS

RATE = 24_000
CHUNK = RATE // 10  # clients send 100 ms at a time
MODEL = "omnitalk-tiny-random"
MANUAL = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
_VOWELS = np.array([(730, 1090, 2440), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240), (530, 1840, 2480)])
_SDK_EVENTS = pydantic.TypeAdapter(RealtimeServerEvent)


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 130 * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    formants = _VOWELS[(t / 0.25).astype(int) % len(_VOWELS)]
    x = np.zeros_like(t)
    for k in range(1, 40):
        gain = sum(1 / (1 + ((k * f0 - formants[:, j]) / (60 + 40 * j)) ** 2) / (j + 1) for j in range(3))
        x += gain * np.sin(k * phase) / np.sqrt(k)
    x *= np.sin(np.pi * ((t / 0.25) % 1)) ** 0.5
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return (samples * 32767).astype("<i2").tobytes()


def chunks(samples: np.ndarray) -> list[str]:
    data = pcm16(samples)
    return [base64.b64encode(data[i : i + 2 * CHUNK]).decode() for i in range(0, len(data), 2 * CHUNK)]


class Events:
    """The server's events in order; each is checked: a type pipecat knows, a fresh event_id, the SDK's schema."""

    def __init__(self, recv: Callable[[], Awaitable[str | bytes]]) -> None:
        self.recv, self.seen, self.ids = recv, [], set()

    async def next(self, timeout: float = 120) -> dict[str, Any]:
        event = json.loads(await asyncio.wait_for(self.recv(), timeout))
        assert event["type"] in SERVER_EVENTS, event["type"]
        assert event["event_id"] not in self.ids
        assert _SDK_EVENTS.validate_python(event).type == event["type"]
        self.ids.add(event["event_id"])
        self.seen.append(event)
        return event

    async def until(self, kind: str, timeout: float = 120) -> list[dict[str, Any]]:
        """Every event up to and including the next one of type `kind`."""
        got = [await self.next(timeout)]
        while got[-1]["type"] != kind:
            got.append(await self.next(timeout))
        return got

    async def error(self) -> dict[str, Any]:
        return (await self.until("error"))[-1]["error"]


@asynccontextmanager
async def realtime(url: str) -> AsyncIterator[tuple[Any, Events]]:
    """The SDK's connection and its event reader, session.created already read."""
    ws_base = url.replace("http://", "ws://") + "/v1"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", websocket_base_url=ws_base)
    async with client.realtime.connect(model=MODEL) as conn:
        events = Events(conn.recv_bytes)
        created = await events.next()
        assert created["type"] == "session.created"
        yield conn, events


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[tuple[Any, Events]]:
    async with websockets.connect(url.replace("http://", "ws://") + f"/v1/realtime?model={MODEL}") as ws:
        events = Events(ws.recv)
        assert (await events.next())["type"] == "session.created"
        yield ws, events


async def send_audio(conn: Any, samples: np.ndarray) -> None:
    for chunk in chunks(samples):
        await conn.input_audio_buffer.append(audio=chunk)


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]
