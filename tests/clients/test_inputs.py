"""The bench's inputs: built-in prompts, spoken inputs, and the JSONL request file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile

from omnitalk.clients.bench.inputs import RATE, load_jsonl, speech_like, spoken_inputs, text_inputs, to_pcm16


def test_builtin_prompts():
    inputs = text_inputs()
    assert len(inputs) >= 4 and all(i.prompt and i.audio is None for i in inputs)


def test_speech_like_signal_sounds_like_speech_in_shape():
    pcm = speech_like("Tell me a short joke about cats.", seed=0)
    samples = np.frombuffer(pcm, np.int16).astype(np.float32) / 32767
    assert 1.0 < len(samples) / RATE < 4.0  # about as long as the sentence said aloud
    assert 0.3 < np.abs(samples).max() <= 0.51
    frames = np.abs(samples[: len(samples) // 480 * 480]).reshape(-1, 480).mean(axis=1)  # 20 ms loudness
    assert (frames < 0.01).mean() > 0.05 and (frames > 0.05).mean() > 0.3  # syllables and pauses
    assert speech_like("same text", 1) == speech_like("same text", 1)


def test_spoken_inputs_say_how_they_were_made():
    inputs, note = spoken_inputs()
    assert len(inputs) == len(text_inputs()) and all(i.audio and i.prompt is None for i in inputs)
    assert "espeak-ng" in note
    wav = inputs[0].wav()
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert rate == RATE and samples.tobytes() == inputs[0].audio
    assert inputs[0].audio_s == pytest.approx(len(samples) / RATE)


def test_resampling_keeps_duration():
    one_second_16k = np.sin(np.arange(16_000) / 10).astype(np.float32) * 0.5
    assert len(to_pcm16(one_second_16k, 16_000)) == 2 * RATE


def write_wav(path, seconds: float, rate: int) -> None:
    soundfile.write(path, np.zeros(int(seconds * rate), np.float32), rate)


def test_jsonl_requests(tmp_path):
    write_wav(tmp_path / "q.wav", 0.5, 16_000)
    lines = [
        {"prompt": "Hello?"},
        {"audio": "q.wav", "max_tokens": 8, "id": "spoken"},
        {"prompt": "What is this?", "audio": str(tmp_path / "q.wav")},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    a, b, c = load_jsonl(path)
    assert (a.id, a.prompt, a.audio, a.max_tokens) == ("line1", "Hello?", None, None)
    assert (b.id, b.prompt, b.max_tokens) == ("spoken", None, 8) and b.audio_s == pytest.approx(0.5)
    assert c.id == "line4" and c.prompt and c.audio


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 1|Expecting"),
        ("[1, 2]", "JSON object"),
        ('{"max_tokens": 3}', '"prompt" or "audio"'),
        ('{"prompt": "x", "max_tokens": 0}', "positive integer"),
        ('{"prompt": "x", "max_tokens": true}', "positive integer"),
        ('{"prompt": 5}', "string"),
        ('{"prompt": "x", "temperature": 1}', "unknown field"),
        ('{"audio": "missing.wav"}', "missing.wav"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"r.jsonl:2: .*({message})"):
        load_jsonl(path)


def test_empty_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        load_jsonl(path)
