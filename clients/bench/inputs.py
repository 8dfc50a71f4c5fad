"""What the bench sends: built-in text prompts, spoken versions of them, or a JSONL file of requests."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

RATE = 24_000  # pcm16 mono at 24 kHz: what the Realtime API takes, and what the bench sends over HTTP too
PROMPTS = (
    "Say hello and tell me your name.",
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Count from one to five.",
    "Describe the sea in one sentence.",
    "What should I cook for dinner tonight?",
    "Tell me a short joke about cats.",
    "How far away is the moon?",
)
JSONL_SCHEMA = """\
one JSON object per line (blank lines are skipped):
  "prompt":     text of the user's turn (optional when "audio" is given)
  "audio":      path to a sound file (wav, flac, ogg, ...) spoken by the user; relative to the JSONL's folder
  "max_tokens": the answer's token budget (optional; default --max-tokens)
  "id":         a name for the request in the results (optional; default line<N>)"""


@dataclass(frozen=True, slots=True)
class BenchInput:
    id: str
    prompt: str | None = None
    audio: bytes | None = None  # pcm16 mono at 24 kHz
    max_tokens: int | None = None  # None: the bench's --max-tokens

    @property
    def audio_s(self) -> float:
        return len(self.audio or b"") / (2 * RATE)

    def wav(self) -> bytes:
        """The input audio as a WAV file (what the chat API's input_audio takes)."""
        buffer = io.BytesIO()
        soundfile.write(buffer, np.frombuffer(self.audio or b"", np.int16), RATE, format="WAV", subtype="PCM_16")
        return buffer.getvalue()


def text_inputs() -> list[BenchInput]:
    return [BenchInput(f"prompt{i}", prompt) for i, prompt in enumerate(PROMPTS)]


def spoken_inputs(seed: int = 0) -> tuple[list[BenchInput], str]:
    """The built-in prompts spoken: by espeak-ng when it is installed, else a synthetic speech-like signal.
    Returns the inputs and a line saying which."""
    if shutil.which("espeak-ng"):
        return [BenchInput(f"spoken{i}", audio=espeak(p)) for i, p in enumerate(PROMPTS)], "spoken by espeak-ng"
    inputs = [BenchInput(f"spoken{i}", audio=speech_like(p, seed + i)) for i, p in enumerate(PROMPTS)]
    note = (
        "espeak-ng is not installed: spoken inputs are a synthetic speech-like signal (voiced harmonics with "
        "syllable-rate amplitude modulation and pauses), not words"
    )
    return inputs, note


def espeak(text: str) -> bytes:
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True, timeout=60).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    return to_pcm16(samples.mean(axis=1), rate)


def speech_like(text: str, seed: int) -> bytes:
    """About as long as `text` spoken: one 'word' per word, each a few syllables of a gliding harmonic tone
    (f0 100-220 Hz, ten harmonics falling off as 1/k) under a 4-6 Hz syllable envelope, with short pauses."""
    rng = np.random.default_rng(seed)
    pieces = []
    for word in text.split():
        seconds = 0.12 + 0.055 * len(word)
        t = np.arange(int(seconds * RATE)) / RATE
        f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
        phase = 2 * np.pi * np.cumsum(f0) / RATE
        voiced = sum(np.sin(k * phase) / k for k in range(1, 11))
        syllables = 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(4, 6) * t))
        pieces += [voiced * syllables, np.zeros(int(rng.uniform(0.05, 0.15) * RATE))]
    signal = np.concatenate(pieces) if pieces else np.zeros(RATE // 10)
    signal = 0.5 * signal / max(float(np.max(np.abs(signal))), 1e-9)
    return to_pcm16(signal, RATE)


def to_pcm16(samples: np.ndarray, rate: int) -> bytes:
    """Mono float samples at `rate` -> pcm16 at 24 kHz (linear interpolation: enough for a load test)."""
    if rate != RATE and len(samples):
        n = round(len(samples) * RATE / rate)
        samples = np.interp(np.arange(n) * rate / RATE, np.arange(len(samples)), samples)
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def load_jsonl(path: Path) -> list[BenchInput]:
    """The requests in a JSONL file (schema: JSONL_SCHEMA). Raises ValueError naming the line at fault."""
    inputs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                inputs.append(_parse_line(json.loads(line), number, Path(path).parent))
            except (ValueError, TypeError, OSError, soundfile.LibsndfileError) as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    if not inputs:
        raise ValueError(f"{path}: no requests in it")
    return inputs


def _parse_line(item: object, number: int, folder: Path) -> BenchInput:
    if not isinstance(item, dict):
        raise ValueError("each line must be a JSON object")
    unknown = set(item) - {"prompt", "audio", "max_tokens", "id"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; expected prompt, audio, max_tokens, id")
    prompt, audio, max_tokens = item.get("prompt"), item.get("audio"), item.get("max_tokens")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError('"prompt" must be a string')
    if audio is not None and not isinstance(audio, str):
        raise ValueError('"audio" must be a file path')
    if not prompt and not audio:
        raise ValueError('a request needs "prompt" or "audio"')
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError('"max_tokens" must be a positive integer')
    pcm = None
    if audio:
        samples, rate = soundfile.read(folder / audio, dtype="float32", always_2d=True)
        pcm = to_pcm16(samples.mean(axis=1), rate)
    return BenchInput(str(item.get("id", f"line{number}")), prompt or None, pcm, max_tokens)
