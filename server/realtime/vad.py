"""Server VAD: Silero VAD (the `silero-vad` package's TorchScript model) over the session's 24 kHz input stream.

The package's own wrapper keeps its recurrent state inside the model object and its import sets torch's thread
count, so this module loads the bundled model file directly and runs the stateless inner network with an explicit
state per stream. torchaudio is never needed: audio is resampled to 16 kHz with libswresample (PyAV).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from importlib.metadata import distribution

import av
import numpy as np
import torch

VAD_RATE = 16_000
WINDOW = 512  # samples per Silero step at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees
WINDOW_MS = WINDOW * 1000 / VAD_RATE
EAGERNESS_SILENCE_MS = {"low": 1000, "medium": 500, "auto": 500, "high": 250}  # semantic_vad, acoustically


@functools.cache
def silero() -> torch.jit.ScriptModule:
    """The 16 kHz network (x [B, 64 + 512], state [2, B, 128]) -> (speech probability [B, 1], state). Shared by
    every stream: it holds no state of its own."""
    path = distribution("silero-vad").locate_file("silero_vad/data/silero_vad.jit")
    with warnings.catch_warnings():  # torch deprecates TorchScript; the package ships no other torch format
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")._model


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    audio_start_ms: int  # on the session's input timeline, prefix padding included


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    audio_end_ms: int  # on the session's input timeline, the closing silence included


@dataclass(slots=True)
class TurnDetector:
    """One stream's detector. `push` takes pcm16 at 24 kHz as the client sends it and returns what happened.

    A turn starts at the first 32 ms window whose speech probability reaches `threshold` and ends once
    `silence_duration_ms` of windows fall below `threshold - 0.15` (Silero's own hysteresis); windows in between
    neither extend nor end the silence.
    """

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    speaking: bool = False
    silent_ms: float = 0.0
    position: int = 0  # 16 kHz samples judged so far
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # < one window
    context: torch.Tensor = field(default_factory=lambda: torch.zeros(1, CONTEXT))
    state: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 1, 128))
    resampler: av.AudioResampler = field(
        default_factory=lambda: av.AudioResampler(format="flt", layout="mono", rate=VAD_RATE)
    )

    def push(self, pcm: bytes) -> list[SpeechStarted | SpeechStopped]:
        """Blocking (model compute): run it in a worker thread."""
        if not pcm:
            return []
        samples = np.concatenate([self.pending, self._resample(pcm)])
        usable = len(samples) - len(samples) % WINDOW
        self.pending = samples[usable:]
        events: list[SpeechStarted | SpeechStopped] = []
        with torch.inference_mode():
            for start in range(0, usable, WINDOW):
                window = torch.from_numpy(samples[start : start + WINDOW])[None]
                probability, self.state = silero()(torch.cat([self.context, window], dim=1), self.state)
                self.context = window[:, -CONTEXT:]
                self.position += WINDOW
                if (found := self._judge(float(probability))) is not None:
                    events.append(found)
        return events

    def end_turn(self) -> None:
        """The client committed or cleared the buffer itself: a turn in progress is over without a stop event."""
        self.speaking, self.silent_ms = False, 0.0

    def _judge(self, probability: float) -> SpeechStarted | SpeechStopped | None:
        end_ms = self.position * 1000 / VAD_RATE
        if probability >= self.threshold:
            self.silent_ms = 0.0
            if not self.speaking:
                self.speaking = True
                return SpeechStarted(max(0, round(end_ms - WINDOW_MS - self.prefix_padding_ms)))
        elif self.speaking and probability < self.threshold - 0.15:
            self.silent_ms += WINDOW_MS
            if self.silent_ms >= self.silence_duration_ms:
                self.end_turn()
                return SpeechStopped(round(end_ms))
        return None

    def _resample(self, pcm: bytes) -> np.ndarray:
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, "<i2").reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 24_000
        out = [f.to_ndarray()[0] for f in self.resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)
