"""The OpenAI Realtime (GA) WebSocket for the bench: the session, paced audio, and a response timed into a record."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection

from omnitalk.clients.bench.inputs import RATE
from omnitalk.clients.bench.metrics import RequestRecord
from omnitalk.clients.client import ServerError

CHUNK_S = 0.1  # input audio goes up in 100 ms chunks at real-time pace, as a microphone would send it
TEXT_DELTAS = ("response.output_audio_transcript.delta", "response.output_text.delta")


@dataclass(frozen=True, slots=True)
class RealtimeTarget:
    base_url: str  # http(s)://host:port; the socket is ws(s)://host:port/v1/realtime?model=...
    model: str
    voice: str
    max_tokens: int

    @property
    def url(self) -> str:
        ws = "wss://" + self.base_url[8:] if self.base_url.startswith("https://") else "ws://" + self.base_url[7:]
        return f"{ws}/v1/realtime?model={quote(self.model)}"


def session_config(target: RealtimeTarget, turn_detection: dict | None) -> dict[str, Any]:
    """Audio out in the target's voice, pcm16 both ways; with server VAD the server creates each response itself,
    so the token budget is the session's."""
    pcm = {"type": "audio/pcm", "rate": RATE}
    return {
        "type": "realtime",
        "output_modalities": ["audio"],
        "max_output_tokens": target.max_tokens,
        "audio": {
            "input": {"format": pcm, "turn_detection": turn_detection},
            "output": {"format": pcm, "voice": target.voice},
        },
    }


async def send(ws: ClientConnection, kind: str, **fields: Any) -> None:
    await ws.send(json.dumps({"type": kind, **fields}))


async def receive(ws: ClientConnection) -> dict[str, Any]:
    """The next event; an `error` event raises ServerError."""
    event = json.loads(await ws.recv())
    if event.get("type") == "error":
        error = event.get("error") or {}
        raise ServerError(f"Realtime error event: {error.get('message', error)}")
    return event


async def expect(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """Skip events until one of type `kind`."""
    while (event := await receive(ws))["type"] != kind:
        pass
    return event


async def append_paced(ws: ClientConnection, pcm: bytes) -> None:
    """Append `pcm` (pcm16, 24 kHz) in CHUNK_S pieces, each sent when a live microphone would have captured it."""
    size, start = int(2 * RATE * CHUNK_S), time.perf_counter()
    for i, offset in enumerate(range(0, len(pcm), size)):
        await asyncio.sleep(max(0.0, start + (i + 1) * CHUNK_S - time.perf_counter()))
        chunk = base64.b64encode(pcm[offset : offset + size]).decode("ascii")
        await send(ws, "input_audio_buffer.append", audio=chunk)


async def read_response(ws: ClientConnection, record: RequestRecord, start: float) -> None:
    last_text = None
    while True:
        event = await receive(ws)
        kind, now = event["type"], time.perf_counter() - start
        if kind.startswith("response.output_") and kind.endswith(".delta"):
            first = record.ttft_s is None
            if first:
                record.ttft_s = now
            if kind in TEXT_DELTAS:
                record.output_text += event.get("delta", "")
                if not first:
                    record.itl_s.append(now - (record.ttft_s if last_text is None else last_text))
                last_text = now
            elif kind == "response.output_audio.delta" and event.get("delta"):
                record.audio_times_s.append(now)
                record.audio_chunk_bytes.append(len(base64.b64decode(event["delta"])))
        elif kind == "response.done":
            record.e2el_s = now
            _finish(record, event.get("response") or {})
            return


def _finish(record: RequestRecord, response: dict[str, Any]) -> None:
    status = response.get("status", "completed")
    if status not in ("completed", "incomplete"):
        details = response.get("status_details") or {}
        reason = (details.get("error") or {}).get("message") or details.get("reason") or ""
        raise ServerError(f"response.done with status {status!r} {reason}".strip())
    usage = response.get("usage") or {}
    record.prompt_tokens, record.completion_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    details = usage.get("output_token_details") or {}
    record.text_tokens, record.audio_tokens = details.get("text_tokens"), details.get("audio_tokens")
    record.success = True
