"""One benchmark request over HTTP chat completions (SSE), timed chunk by chunk into a RequestRecord."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from omnitalk.clients.bench.inputs import BenchInput
from omnitalk.clients.bench.metrics import RequestRecord
from omnitalk.clients.client import Reply, add_chunk, chat_request, stream_chunks


@dataclass(frozen=True, slots=True)
class HTTPTarget:
    base_url: str  # http(s)://host:port
    model: str
    voice: str
    max_tokens: int
    timeout: float = 300.0

    @property
    def url(self) -> str:
        return self.base_url + "/v1/chat/completions"


async def send_chat(http: httpx.AsyncClient, target: HTTPTarget, item: BenchInput, record: RequestRecord) -> None:
    """Send `item`, fill `record`. TTFT: the first chunk with non-empty choices (as vllm); E2EL: the last such
    chunk; ITL: gaps between chunks that carry text; audio: every chunk with non-empty delta.audio.data."""
    wav = item.wav() if item.audio else None
    body = chat_request(target.model, item.prompt, wav, target.voice, item.max_tokens or target.max_tokens)
    record.input_audio_s = item.audio_s
    reply, last_text = Reply(), None
    start = time.perf_counter()
    async for chunk in stream_chunks(http, target.url, body):
        now = time.perf_counter() - start
        text, audio = add_chunk(reply, chunk)
        if not chunk.get("choices"):
            continue  # the usage chunk: not a token
        if record.ttft_s is None:
            record.ttft_s = last_text = now
        elif text:
            record.itl_s.append(now - last_text)
            last_text = now
        if audio:
            record.audio_times_s.append(now)
            record.audio_chunk_bytes.append(len(audio))
        record.e2el_s = now
    record.output_text = reply.text
    _set_usage(record, reply.usage)
    record.success = True


def _set_usage(record: RequestRecord, usage: dict | None) -> None:
    if not usage:
        return
    record.prompt_tokens = usage.get("prompt_tokens")
    record.completion_tokens = usage.get("completion_tokens")
    details = usage.get("completion_tokens_details") or {}
    record.text_tokens, record.audio_tokens = details.get("text_tokens"), details.get("audio_tokens")
