"""SSE parsing of a recorded chat stream, and the HTTP bench client's timings over it (httpx's mock transport)."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest

from omnitalk.clients.bench.http_client import HTTPTarget, send_chat
from omnitalk.clients.bench.inputs import BenchInput
from omnitalk.clients.bench.metrics import RequestRecord
from omnitalk.clients.client import Reply, ServerError, add_chunk, chat_request, sse_data, stream_chunks

AUDIO = base64.b64encode(b"\x01\x00" * 2400).decode()  # 0.1 s of pcm16 at 24 kHz
HEAD = '"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m"'
# As OpenAI sends it (community.openai.com/t/970884), with a keep-alive comment and CRLF line ends mixed in.
RECORDED = (
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"role":"assistant","content":null}},"finish_reason":null}}],'
    '"usage":null}\n\n'
    ": keep-alive\n\n"
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"audio":{{"id":"audio_1","transcript":"Hi"}}}},'
    '"finish_reason":null}],"usage":null}\r\n\r\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"audio":{{"id":"audio_1","data":"{AUDIO}"}}}},'
    '"finish_reason":null}],"usage":null}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"audio":{{"transcript":" there"}}}},"finish_reason":null}}],'
    '"usage":null}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"audio":{{"id":"audio_1","data":"{AUDIO}"}}}},'
    '"finish_reason":null}],"usage":null}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[{{"index":0,"delta":{{"audio":{{"expires_at":1729447778}}}}}}],"usage":null}}\n\n'
    f'data: {{{HEAD},"choices":[],"usage":{{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42,'
    '"completion_tokens_details":{"text_tokens":2,"audio_tokens":28}}}\n\n'
    "data: [DONE]\n\n"
)


def test_sse_parser_on_a_recorded_stream():
    events = list(sse_data(RECORDED.splitlines(keepends=True)))
    assert len(events) == 9 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    reply = Reply()
    for chunk in chunks:
        add_chunk(reply, chunk)
    assert reply.text == "Hi there" and len(reply.audio) == 9600
    assert reply.finish_reason == "stop" and reply.usage["completion_tokens"] == 30


def test_sse_parser_details():
    lines = ["event: x", "data: {", 'data:  "a": 1}', "id: 7", "", ": comment", "", "data: tail"]
    assert list(sse_data(lines)) == ['{\n "a": 1}', "tail"]


def mock_client(body, status: int = 200, delay: float = 0.0) -> httpx.AsyncClient:
    async def pieces():
        for event in body.split("\n\n"):
            await asyncio.sleep(delay)
            yield (event + "\n\n").encode()

    def handler(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        assert sent["stream"] and sent["stream_options"] == {"include_usage": True}
        assert sent["audio"] == {"voice": "alloy", "format": "pcm16"} and sent["modalities"] == ["text", "audio"]
        if status != 200:
            return httpx.Response(status, json=body)
        return httpx.Response(200, content=pieces(), headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


TARGET = HTTPTarget("http://server", "m", "alloy", 8)


async def test_http_client_times_a_recorded_stream():
    record = RequestRecord(0, "http", "q")
    async with mock_client(RECORDED, delay=0.01) as http:
        await send_chat(http, TARGET, BenchInput("q", "Hello?"), record)
    assert record.success and record.output_text == "Hi there"
    assert record.audio_bytes == 9600 and record.audio_s == pytest.approx(0.2)
    assert 0 < record.ttft_s < record.ttfa_s <= record.e2el_s
    assert len(record.itl_s) == 2  # the two transcript chunks after the TTFT chunk
    assert len(record.audio_times_s) == 2
    assert (record.prompt_tokens, record.completion_tokens, record.text_tokens, record.audio_tokens) == (12, 30, 2, 28)
    assert record.tpot_s == pytest.approx((record.e2el_s - record.ttft_s) / 29)


async def test_http_errors_raise_with_the_servers_message():
    error = {"error": {"message": "unsupported voice 'nope'", "type": "invalid_request_error"}}
    async with mock_client(error, status=400) as http:
        with pytest.raises(ServerError, match="HTTP 400: unsupported voice 'nope'"):
            await send_chat(http, TARGET, BenchInput("q", "Hello?"), RequestRecord(0, "http", "q"))
    first_events = "\n\n".join(RECORDED.split("\n\n")[:3])
    broken = first_events + '\n\ndata: {"error":{"message":"engine died"}}\n\ndata: [DONE]\n\n'
    async with mock_client(broken) as http:
        with pytest.raises(ServerError, match="engine died"):
            await send_chat(http, TARGET, BenchInput("q", "Hello?"), RequestRecord(0, "http", "q"))
    cut = RECORDED.removesuffix("data: [DONE]\n\n")
    async with mock_client(cut) as http:
        with pytest.raises(ServerError, match=r"without \[DONE\]"):
            await send_chat(http, TARGET, BenchInput("q", "Hello?"), RequestRecord(0, "http", "q"))


def test_chat_request_with_audio_input():
    body = chat_request("m", "What is said?", wav=b"RIFF....", voice="echo", max_tokens=5)
    text, audio = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "What is said?"}
    assert audio["input_audio"]["format"] == "wav" and base64.b64decode(audio["input_audio"]["data"]) == b"RIFF...."
    assert body["max_tokens"] == 5 and body["audio"]["voice"] == "echo"
    assert "audio" not in chat_request("m", "x", voice=None)


async def test_stream_chunks_yields_in_order():
    async with mock_client(RECORDED) as http:
        body = chat_request("m", "x")
        chunks = [c async for c in stream_chunks(http, "http://server/v1/chat/completions", body)]
    assert len(chunks) == 8 and chunks[-1]["choices"] == []
