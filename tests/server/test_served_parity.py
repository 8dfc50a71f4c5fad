"""What `omnitalk serve` serves with no flags is what transformers computes: greedy text over HTTP, compared
with the oracle's fp32 thinker.generate, for a text and an audio prompt (the `server` fixture's engine is
built from ServerSettings defaults by the app's own settings -> EngineConfig function)."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import soundfile
from oracle import Reference
from thinker_cases import tone

from omnitalk.engine.media import SAMPLE_RATE, load_audio
from omnitalk.engine.thinker.config import served_dtype

MAX_TOKENS = 24


def wav(samples) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def test_the_served_thinker_dtype_is_the_checkpoints(served):
    assert served.thinker.dtype == "auto"  # nothing in the fixtures forces fp32: the default resolves to it
    assert served_dtype(served.thinker) == "float32"


@pytest.mark.parametrize("kind", ["text", "audio"])
async def test_served_greedy_text_equals_transformers_fp32(server, reference: Reference, kind: str):
    question = "Tell me about lighthouses."
    if kind == "text":
        content: list[dict] = [{"type": "text", "text": question}]
        oracle_content: list[dict] = [{"type": "text", "text": question}]
    else:
        data = wav(tone(2.0))
        audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}
        content = [audio_part, {"type": "text", "text": question}]
        # The samples the server decodes from those bytes, so both sides see the same input.
        oracle_content = [{"type": "audio", "audio": load_audio(data)}, {"type": "text", "text": question}]
    body = {
        "model": "any",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(server[0] + "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()

    expected = reference.generate([{"role": "user", "content": oracle_content}], max_new_tokens=MAX_TOKENS, audio=False)
    tokenizer = reference.processor.tokenizer
    assert answer["usage"]["prompt_tokens"] == len(expected.prompt_ids)
    assert answer["usage"]["completion_tokens"] == len(expected.thinker_tokens)
    text = tokenizer.decode(expected.thinker_tokens, skip_special_tokens=True)
    assert answer["choices"][0]["message"]["content"] == text
