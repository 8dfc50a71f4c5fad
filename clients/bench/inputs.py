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
    return inputs, "espeak-ng is not installed: spoken inputs are " + SYNTHETIC


def utterance_inputs(lengths: list[float], seed: int = 0) -> tuple[list[BenchInput], str]:
    """One utterance of each length (seconds, rounded to whole 100 ms), without pauses: what server VAD must hear
    as one turn however long it is."""
    inputs = []
    for i, seconds in enumerate(lengths):
        samples = vowels(round(seconds, 1), np.random.default_rng(seed + i))
        inputs.append(BenchInput(f"utterance{seconds:g}s", audio=to_pcm16(samples, RATE)))
    return inputs, "utterances are " + SYNTHETIC


SYNTHETIC = (
    "a synthetic speech-like signal (a gliding voice through the formants of five vowels, four syllables a second, "
    "that Silero VAD hears as speech), not words"
)
# First three formants (Hz) of /a/, /i/, /e/, /u/, /o/: without them Silero does not take harmonics for a voice.
FORMANTS = np.array([(730, 1090, 2440), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240), (530, 1840, 2480)])
SYLLABLE_S = 0.25


def espeak(text: str) -> bytes:
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True, timeout=60).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    return to_pcm16(samples.mean(axis=1), rate)


def speech_like(text: str, seed: int) -> bytes:
    """About as long as `text` spoken: one 'word' of vowels per word, with short pauses between words."""
    rng = np.random.default_rng(seed)
    pieces = []
    for word in text.split():
        pieces += [vowels(0.12 + 0.055 * len(word), rng), np.zeros(int(rng.uniform(0.05, 0.15) * RATE))]
    signal = np.concatenate(pieces) if pieces else np.zeros(RATE // 10)
    return to_pcm16(signal, RATE)


def vowels(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """`seconds` of a voice at 24 kHz, peak 0.5: harmonics of a gliding f0 (110-160 Hz) shaped by the formants of
    one vowel per syllable (in turn, from a random one) under a syllable envelope."""
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = rng.uniform(110, 160) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    formants = FORMANTS[(rng.integers(len(FORMANTS)) + (t / SYLLABLE_S).astype(int)) % len(FORMANTS)]
    x = np.zeros_like(t)
    for k in range(1, 40):
        gain = sum(1 / (1 + ((k * f0 - formants[:, j]) / (60 + 40 * j)) ** 2) / (j + 1) for j in range(3))
        x += gain * np.sin(k * phase) / np.sqrt(k)
    x *= np.sin(np.pi * ((t / SYLLABLE_S) % 1)) ** 0.5
    return 0.5 * x / max(float(np.abs(x).max(initial=0.0)), 1e-9)


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
