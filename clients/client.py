"""A small streaming client for OpenAI-style chat completions with audio out (server-sent events parsed here)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx


class ServerError(Exception):
    """The server refused a request (HTTP status) or ended its stream with an error frame (status None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class SSEParser:
    """Server-sent events, one line at a time: `feed` returns an event's data once its blank line arrives.
    Multi-line data is joined with newlines; comments (":") and other fields (event, id, retry) are skipped."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The last event when the stream ended without its blank line."""
        return self.feed("")


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """Each event's data in a stream of lines."""
    parser = SSEParser()
    for line in lines:
        if (data := parser.feed(line)) is not None:
            yield data
    if (data := parser.flush()) is not None:
        yield data


def chat_request(
    model: str,
    prompt: str | None = None,
    wav: bytes | None = None,
    voice: str | None = "alloy",
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """A streaming chat completion body: one user turn (text and/or WAV audio); audio out as pcm16 when `voice`."""
    content: list[dict[str, Any]] = []
    if prompt:
        content.append({"type": "text", "text": prompt})
    if wav:
        data = base64.b64encode(wav).decode("ascii")
        content.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if voice:
        body |= {"modalities": ["text", "audio"], "audio": {"voice": voice, "format": "pcm16"}}
    if max_tokens:
        body["max_tokens"] = max_tokens
    return body


async def stream_chunks(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """POST `body` to `url` (…/v1/chat/completions) and yield each chunk as it arrives, until `[DONE]`.
    Raises ServerError on an HTTP error status, an error frame, or a stream cut short."""
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise ServerError(error_message(await response.aread()), response.status_code)
        parser = SSEParser()
        async for line in response.aiter_lines():
            data = parser.feed(line)
            if data is None:
                continue
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServerError(error_message(data.encode()))
            yield chunk
    raise ServerError("the stream ended without [DONE]")


def error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, else the body itself (shortened)."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()
        return text[:300] or "(empty body)"


@dataclass(slots=True)
class Reply:
    text: str = ""
    audio: bytearray = field(default_factory=bytearray)  # pcm16 mono, 24 kHz
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None


def add_chunk(reply: Reply, chunk: dict[str, Any]) -> tuple[str, bytes]:
    """Fold one chunk into `reply`; returns the text and the audio bytes it carried."""
    if chunk.get("usage"):
        reply.usage = chunk["usage"]
    text, audio = "", b""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        text += delta.get("content") or ""
        spoken = delta.get("audio") or {}
        text += spoken.get("transcript") or ""
        if spoken.get("data"):
            audio += base64.b64decode(spoken["data"])
        reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
    reply.text += text
    reply.audio += audio
    return text, audio


async def chat(
    base_url: str, prompt: str, voice: str = "alloy", model: str = "default", max_tokens: int | None = None
) -> Reply:
    """One spoken answer: its text, its pcm16 audio and usage. `base_url` is the server's root (http://host:port)."""
    reply = Reply()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=300.0)) as http:
        body = chat_request(model, prompt, voice=voice, max_tokens=max_tokens)
        async for chunk in stream_chunks(http, base_url.rstrip("/") + "/v1/chat/completions", body):
            add_chunk(reply, chunk)
    return reply
