"""POST /v1/chat/completions on the real server, through the openai SDK (and httpx for what the SDK hides)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator

import av
import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio
import soundfile
from PIL import Image

from omnitalk.engine.omni import TextDelta
from omnitalk.engine.thinker.prompt import SPEECH_SYSTEM_PROMPT, audio_token_count
from omnitalk.server.chat.messages import TranscriptCache, convert
from omnitalk.server.chat.protocol import parse_request

SAMPLES_PER_CODE = 480  # 24 kHz / 50 codes per second
MODEL = "omnitalk-tiny-random"
HELLO = [{"role": "user", "content": "Say hello."}]
F_TOOL = {"type": "function", "function": {"name": "f"}}
CALL_G = {"type": "function", "function": {"name": "g"}}
SPEAK = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}}


@pytest_asyncio.fixture(loop_scope="session")
async def sdk(server) -> AsyncIterator[openai.AsyncOpenAI]:
    """The openai SDK, async (the server runs on the test's event loop), without its retries."""
    async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0) as client:
        yield client


def sine(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def wav_base64(samples: np.ndarray, rate: int) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def png_data_url(size: tuple[int, int] = (56, 56)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def mp4_data_url(frames: int = 8, rate: int = 4) -> str:
    """A small mp4 with a 48 kHz sine soundtrack."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=rate)
        video.width, video.height, video.pix_fmt = 56, 56, "yuv420p"
        sound = container.add_stream("aac", rate=48_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(sine(48_000, frames / rate)[None], format="flt", layout="mono")
        frame.sample_rate = 48_000
        container.mux([*sound.encode(frame), *sound.encode(None)])
        for i in range(frames):
            pixels = np.full((56, 56, 3), 30 * i, dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(video.encode(None))
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


def decoded_seconds(data: bytes) -> float:
    try:
        samples, rate = soundfile.read(io.BytesIO(data))
        return len(samples) / rate
    except soundfile.LibsndfileError:
        with av.open(io.BytesIO(data)) as container:
            frames = list(container.decode(audio=0))
        return sum(f.samples for f in frames) / frames[0].sample_rate


async def post(url: str, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        return await http.post("/v1/chat/completions", **kwargs)


def sse_events(text: str) -> list[dict | str]:
    frames = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    return [f if f == "[DONE]" else json.loads(f) for f in frames]


async def engine_idle(state) -> bool:
    engine = state.engine
    for _ in range(100):
        idle = engine.speech.num_streams == 0 and not engine.thinker.llm.output_processor.has_unfinished_requests()
        if idle and state.limiter.active == 0:
            return True
        await asyncio.sleep(0.1)
    return False


# --- text ---


async def test_text_answer(sdk):
    answer = await sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, seed=1)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == MODEL and answer.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.audio is None and choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.completion_tokens == usage.completion_tokens_details.text_tokens <= 8
    assert usage.completion_tokens_details.audio_tokens == 0
    assert usage.prompt_tokens == usage.prompt_tokens_details.text_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_text_stream_frames_and_usage(server, sdk):
    url, _ = server
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "stream": True}
    body["stream_options"] = {"include_usage": True}
    response = await post(url, json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    *chunks, usage_chunk, done = sse_events(response.text)
    assert done == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert all(c["usage"] is None and c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] <= 8
    assert len({c["id"] for c in [*chunks, usage_chunk]}) == 1

    # The same through the SDK, without usage: no usage field at all.
    stream = await sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


# --- audio out ---


async def test_streamed_speech_is_pcm16_of_every_code(sdk):
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, seed=3, stream=True, stream_options={"include_usage": True}, **SPEAK
    )
    chunks = [chunk async for chunk in stream]
    *answer, usage_chunk = chunks
    deltas = [c.choices[0].delta for c in answer]
    assert deltas[0].role == "assistant" and deltas[0].content is None
    audio = [d.audio for d in deltas if d.audio]
    pcm = b"".join(base64.b64decode(a.data) for a in audio if a.data)
    assert len(pcm) == usage_chunk.usage.completion_tokens_details.audio_tokens * SAMPLES_PER_CODE * 2 > 0
    assert "".join(a.transcript or "" for a in audio)
    assert len({a.id for a in audio if a.id}) == 1
    # The finish_reason chunk, then OpenAI's closing audio update: the expiry alone, no finish_reason.
    assert answer[-2].choices[0].finish_reason in ("stop", "length")
    closing = answer[-1].choices[0].delta.audio
    assert closing.model_dump(exclude_none=True) == {"expires_at": pytest.approx(answer[0].created + 3600, abs=5)}
    assert answer[-1].choices[0].finish_reason is None
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens_details.text_tokens <= 4


async def test_spoken_answer_as_wav_and_its_audio_id_in_a_later_turn(sdk):
    speak = {**SPEAK, "audio": {"voice": "Ethan", "format": "wav"}}
    answer = await sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, seed=4, **speak)
    message, usage = answer.choices[0].message, answer.usage
    assert message.content is None and message.audio.transcript and message.audio.id.startswith("audio_")
    assert message.audio.expires_at > answer.created
    codes = usage.completion_tokens_details.audio_tokens
    assert codes > 0 and usage.completion_tokens == codes + usage.completion_tokens_details.text_tokens
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(message.audio.data)))
    assert rate == 24_000 and len(samples) == codes * SAMPLES_PER_CODE

    # A later turn may refer to the answer by its audio id alone: the server uses its transcript.
    def history(assistant: dict) -> list[dict]:
        return [*HELLO, {"role": "assistant", **assistant}, {"role": "user", "content": "More."}]

    async def prompt_tokens(assistant: dict) -> int:
        answer = await sdk.chat.completions.create(model=MODEL, messages=history(assistant), max_tokens=1)
        return answer.usage.prompt_tokens

    by_id = await prompt_tokens({"audio": {"id": message.audio.id}})
    assert by_id == await prompt_tokens({"content": message.audio.transcript})
    with pytest.raises(openai.BadRequestError, match="audio id 'audio_nope'"):
        await prompt_tokens({"audio": {"id": "audio_nope"}})


@pytest.mark.parametrize("format", ["mp3", "flac", "opus"])
async def test_spoken_answer_in_compressed_formats(format, sdk):
    speak = {**SPEAK, "audio": {"voice": "shimmer", "format": format}}
    answer = await sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, seed=5, **speak)
    seconds = answer.usage.completion_tokens_details.audio_tokens * SAMPLES_PER_CODE / 24_000
    assert seconds > 0
    assert decoded_seconds(base64.b64decode(answer.choices[0].message.audio.data)) == pytest.approx(seconds, abs=0.05)


# --- input media ---


async def test_audio_and_image_input_are_counted_in_usage(sdk):
    audio = sine(16_000, 1.0)
    content = [
        {"type": "input_audio", "input_audio": {"data": wav_base64(audio, 16_000), "format": "wav"}},
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "text", "text": "What do you hear and see?"},
    ]
    answer = await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2
    )
    details = answer.usage.prompt_tokens_details
    assert details.audio_tokens == audio_token_count(16_000) == 25 and details.image_tokens > 0
    assert details.text_tokens + details.audio_tokens + details.image_tokens == answer.usage.prompt_tokens

    # Without the image, every media token is the audio's: the formula matches the thinker's count.
    alone = await sdk.chat.completions.create(model=MODEL, messages=user(*content[::2]), max_tokens=1)
    assert alone.usage.prompt_tokens_details.image_tokens == 0
    assert alone.usage.prompt_tokens_details.audio_tokens == 25


async def test_pcm16_input_and_audio_in_video(sdk):
    pcm = (sine(8_000, 0.5) * 32767).astype("<i2").tobytes()
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(pcm).decode(), "format": "pcm16"}}
    answer = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [part]}],
        max_tokens=1,
        extra_body={"omnitalk": {"input_audio_sample_rate": 8_000}},
    )
    assert answer.usage.prompt_tokens_details.audio_tokens == audio_token_count(8_000)  # 0.5 s at 16 kHz

    video = [{"type": "video_url", "video_url": {"url": mp4_data_url()}}, {"type": "text", "text": "Describe."}]
    answer = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": video}],
        max_tokens=1,
        extra_body={"omnitalk": {"use_audio_in_video": True}},
    )
    details = answer.usage.prompt_tokens_details
    assert details.audio_tokens == audio_token_count(2 * 16_000) and details.image_tokens > 0


async def test_speech_inserts_qwens_system_prompt_unless_one_is_sent(server):
    _, state = server
    tokenizer = state.engine.thinker.tokenizer

    def first_message(messages: list[dict]):
        request = parse_request(json.dumps({"messages": messages, **SPEAK}).encode())
        return convert(request, TranscriptCache(), tokenizer, 600.0).messages[0]

    assert first_message(HELLO).content[0].text == SPEECH_SYSTEM_PROMPT
    assert first_message([{"role": "developer", "content": "Be brief."}, *HELLO]).content[0].text == "Be brief."


# --- refusals, each a 4xx in OpenAI's shape ---


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"n": 2}, "n", "n > 1 is not supported"),
        ({"functions": [{"name": "f"}]}, "functions", "use tools"),
        ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools' are specified"),
        ({"tools": [F_TOOL], "tool_choice": CALL_G}, "tool_choice", "no function named 'g'"),
        ({"max_tokens": 8180}, "max_tokens", "maximum context length is 8192 tokens"),
        ({"max_completion_tokens": 9000}, "max_completion_tokens", "Please reduce the length"),
        ({"logprobs": True}, "logprobs", "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format", "structured outputs"),
        ({"modalities": ["text", "audio"]}, "audio", '"audio" is required'),
        ({**SPEAK, "stream": True, "audio": {"voice": "alloy", "format": "wav"}}, "audio.format", "'pcm16'"),
        ({**SPEAK, "audio": {"voice": "nobody", "format": "wav"}}, "audio.voice", "Chelsie, Ethan, alloy"),
        ({"temperature": "hot"}, "temperature", "valid number"),
    ],
)
async def test_unsupported_or_invalid_options_are_400(extra, param, message, sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model=MODEL, messages=HELLO, **extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"]


def user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}), "fetches nothing"),
        (user({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}), "content[0]: the image"),
        (user({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}), "not valid base64"),
        (user({"type": "input_audio", "input_audio": {"data": "AAAAAAAA", "format": "mp3"}}), "audio"),
        (user({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}), "format: Input should"),
        (user({"type": "file", "file": {}}), "Input tag 'file'"),
        ([{"role": "tool", "content": "x"}], "tool_call_id: Field required"),
        ([], "messages"),
        ([{"role": "user", "content": "hello " * 9000}], "maximum context length"),
    ],
)
async def test_bad_input_is_a_clear_400(server, messages, message):
    url, _ = server
    response = await post(url, json={"model": MODEL, "messages": messages})
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert message in response.json()["error"]["message"]


async def test_bad_json_and_oversized_bodies(server):
    url, state = server
    bad = await post(url, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "could not parse the JSON" in bad.json()["error"]["message"]
    limit = state.settings.max_message_bytes
    state.settings.max_message_bytes = 1000
    try:
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        declared = await post(url, content=big)

        async def chunked():  # no Content-Length: the bytes read are counted
            for start in range(0, len(big), 300):
                yield big[start : start + 300]

        sent = await post(url, content=chunked())
    finally:
        state.settings.max_message_bytes = limit
    for response in (declared, sent):
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


async def test_stream_limit_is_429_with_retry_after(server, sdk):
    _, state = server
    limit = state.limiter.limit
    state.limiter.limit = 0
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    finally:
        state.limiter.limit = limit
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["type"] == "rate_limit_error"


async def test_audio_longer_than_the_limit_is_400(server):
    url, state = server
    limit = state.settings.max_audio_seconds
    state.settings.max_audio_seconds = 0.5
    try:
        part = {"type": "input_audio", "input_audio": {"data": wav_base64(sine(16_000, 1.0), 16_000), "format": "wav"}}
        response = await post(url, json={"messages": user(part)})
    finally:
        state.settings.max_audio_seconds = limit
    assert response.status_code == 400 and "at most 0.5 s" in response.json()["error"]["message"]


# --- leaving early ---


async def test_client_leaving_mid_stream_frees_every_stage(server, sdk):
    url, state = server
    stream = await sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=200, stream=True, **SPEAK)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.audio and chunk.choices[0].delta.audio.data:
            break
    assert state.limiter.active == 1 and state.engine.speech.num_streams == 1
    await stream.close()
    assert await engine_idle(state)
    assert state.engine.speech.talker.num_free_slots == state.engine.speech.max_batch
    metrics = (await httpx.AsyncClient(base_url=url).get("/metrics")).text
    assert 'omnitalk:requests_total{status="cancelled"}' in metrics and "omnitalk:live_streams 0.0" in metrics


async def test_client_leaving_before_a_whole_answer_frees_every_stage(server):
    url, state = server
    body = {"messages": HELLO, "max_tokens": 200, **SPEAK, "audio": {"voice": "alloy", "format": "wav"}}
    waiting = asyncio.create_task(post(url, json=body))
    for _ in range(100):
        if state.engine.speech.num_streams:
            break
        await asyncio.sleep(0.05)
    assert state.limiter.active == 1 and state.engine.speech.num_streams == 1
    waiting.cancel()  # closes the connection
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await engine_idle(state)


async def test_engine_failure_mid_stream_is_an_error_frame(server, monkeypatch):
    url, state = server

    async def failing(request):
        yield TextDelta("Hi", [1])
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(state.engine, "generate", failing)
    response = await post(url, json={"messages": HELLO, "stream": True})
    *chunks, error, done = sse_events(response.text)
    assert response.status_code == 200 and done == "[DONE]"
    assert chunks[-1]["choices"][0]["delta"] == {"content": "Hi"}
    assert error["error"]["type"] == "server_error" and error["error"]["code"] is None
    assert error["error"]["message"].startswith("internal server error (reference error_")
    assert "broke" not in error["error"]["message"]  # internal words stay in the log
    assert state.limiter.active == 0
