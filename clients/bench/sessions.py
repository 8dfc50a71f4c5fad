"""Realtime turns in sessions: manual (append, commit, response.create) or server VAD (the user speaks in real time
into an always-open microphone and the server decides when the turn ended), one or several turns per session."""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import websockets
from websockets.asyncio.client import ClientConnection

from omnitalk.clients.bench.inputs import RATE, BenchInput
from omnitalk.clients.bench.metrics import RequestRecord
from omnitalk.clients.bench.realtime_client import (
    CHUNK_S,
    RealtimeTarget,
    append_paced,
    expect,
    read_response,
    receive,
    send,
    session_config,
)
from omnitalk.clients.client import ServerError

CHUNK_BYTES = int(2 * RATE * CHUNK_S)
TURN_DETECTIONS = ("manual", "server_vad")


@dataclass(frozen=True, slots=True)
class TurnTaking:
    """How the bench's Realtime sessions take turns."""

    detection: str = "manual"  # or "server_vad"
    turns: int = 1  # per session; a session is reused, turn after turn, until it has had this many
    silence_ms: int = 500  # server VAD's silence_duration_ms: the pause that ends a turn
    lead_s: float = 0.5  # of silence before each utterance (server VAD)
    vad_grace_s: float = 10.0  # how long after the speech ended the server may take to end the turn

    def __post_init__(self) -> None:
        if self.detection not in TURN_DETECTIONS:
            raise ValueError(f"turn detection must be one of {', '.join(TURN_DETECTIONS)}, not {self.detection!r}")
        if self.turns < 1 or self.silence_ms < 32 or self.lead_s < 0:
            raise ValueError("a session needs at least 1 turn, server VAD a silence of at least 32 ms")

    def turn_detection(self) -> dict | None:
        """The session's `audio.input.turn_detection`."""
        if self.detection == "manual":
            return None
        return {"type": "server_vad", "silence_duration_ms": self.silence_ms, "create_response": True}


class Microphone:
    """Sends pcm16 in CHUNK_S pieces, each when a live microphone would have captured it; silence when the user is
    not speaking. `say` returns when the utterance's last sample would have been spoken."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self.queue = ws, deque[tuple[bytes, asyncio.Future[float] | None, float]]()
        self.task = asyncio.create_task(self._run())

    def say(self, pcm: bytes) -> asyncio.Future[float]:
        """Queue `pcm`; the future gets the perf_counter time at which its last sample was spoken."""
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        pieces = [pcm[i : i + CHUNK_BYTES] for i in range(0, len(pcm), CHUNK_BYTES)] or [b""]
        pad_s = (CHUNK_BYTES - len(pieces[-1])) / (2 * RATE)
        pieces[-1] = pieces[-1].ljust(CHUNK_BYTES, b"\0")
        self.queue.extend((piece, None, 0.0) for piece in pieces[:-1])
        self.queue.append((pieces[-1], done, pad_s))
        return done

    async def _run(self) -> None:
        start, silence = time.perf_counter(), bytes(CHUNK_BYTES)
        for k in itertools.count(1):
            await asyncio.sleep(max(0.0, start + k * CHUNK_S - time.perf_counter()))
            piece, done, pad_s = self.queue.popleft() if self.queue else (silence, None, 0.0)
            await send(self.ws, "input_audio_buffer.append", audio=base64.b64encode(piece).decode("ascii"))
            if done is not None and not done.done():
                done.set_result(time.perf_counter() - pad_s)  # its last sample came pad_s before the chunk's end

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@dataclass(slots=True)
class Session:
    ws: ClientConnection
    taking: TurnTaking
    mic: Microphone | None = None  # server VAD only
    turns_done: int = 0

    @classmethod
    async def open(cls, target: RealtimeTarget, taking: TurnTaking) -> Session:
        ws = await websockets.connect(target.url, max_size=None, compression=None, open_timeout=30)
        try:
            await expect(ws, "session.created")
            await send(ws, "session.update", session=session_config(target, taking.turn_detection()))
            await expect(ws, "session.updated")
        except BaseException:
            await ws.close()
            raise
        return cls(ws, taking, Microphone(ws) if taking.detection == "server_vad" else None)

    async def turn(self, item: BenchInput, record: RequestRecord, max_tokens: int) -> None:
        """One turn: the user's text item, if any, then their speech; the answer read into `record`.
        turn_s = first audio byte of the answer - end of the user's speech (the last speech sample sent)."""
        record.input_audio_s, record.turn_number = item.audio_s, self.turns_done + 1
        self.turns_done += 1
        if item.prompt:
            content = [{"type": "input_text", "text": item.prompt}]
            await send(self.ws, "conversation.item.create",
                       item={"type": "message", "role": "user", "content": content})  # fmt: skip
        if self.mic is None:
            await self._manual_turn(item, record, max_tokens)
        else:
            await self._vad_turn(item, record)

    async def _manual_turn(self, item: BenchInput, record: RequestRecord, max_tokens: int) -> None:
        speech_end = None
        if item.audio:
            await append_paced(self.ws, item.audio)
            speech_end = time.perf_counter()
            await send(self.ws, "input_audio_buffer.commit")
        await send(self.ws, "response.create", response={"max_output_tokens": item.max_tokens or max_tokens})
        start = time.perf_counter()
        await read_response(self.ws, record, start)
        if speech_end is not None:  # a text turn has no voice-to-voice latency
            record.speech_end_s = speech_end - start

    async def _vad_turn(self, item: BenchInput, record: RequestRecord) -> None:
        """The server creates the response itself (with the session's token budget): the request starts when
        input_audio_buffer.speech_stopped arrives."""
        if not item.audio:
            raise ValueError(f"input {item.id!r} has no audio: server VAD turns need spoken inputs")
        assert self.mic is not None
        spoken = self.mic.say(bytes(2 * round(self.taking.lead_s * RATE)) + item.audio)
        limit = self.taking.lead_s + item.audio_s + self.taking.vad_grace_s
        try:
            async with asyncio.timeout(limit):
                while (event := await receive(self.ws))["type"] != "input_audio_buffer.speech_stopped":
                    pass
        except TimeoutError:
            raise ServerError(f"server VAD did not end the turn within {self.taking.vad_grace_s:g} s after the "
                              "utterance: is the input speech?") from None  # fmt: skip
        start = time.perf_counter()
        if not spoken.done():
            raise ServerError(f"server VAD ended the turn at {event.get('audio_end_ms')} ms, before the utterance")
        await read_response(self.ws, record, start)
        record.speech_end_s = spoken.result() - start

    async def close(self) -> None:
        if self.mic is not None:
            await self.mic.close()
        await self.ws.close()


@dataclass(slots=True)
class RealtimeSessions:
    """The Realtime sender: each turn takes an idle session (or opens one), and gives it back until it has had
    `taking.turns` turns; a session whose turn failed is closed."""

    target: RealtimeTarget
    taking: TurnTaking
    idle: list[Session] = field(default_factory=list)

    async def __call__(self, item: BenchInput, record: RequestRecord) -> None:
        session = self.idle.pop() if self.idle else await Session.open(self.target, self.taking)
        try:
            await session.turn(item, record, self.target.max_tokens)
        except BaseException:
            await session.close()
            raise
        if session.turns_done < self.taking.turns:
            self.idle.append(session)
        else:
            await session.close()

    async def aclose(self) -> None:
        """Close the idle sessions (between runs, so that runs do not share sessions)."""
        sessions, self.idle = self.idle, []
        for session in sessions:
            await session.close()
