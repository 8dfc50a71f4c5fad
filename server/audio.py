"""The engine's audio (float32 mono, 24 kHz) as the bytes clients ask for: pcm16, wav, flac, mp3, opus, aac."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import soundfile

SAMPLE_RATE = 24_000
FORMATS = ("pcm16", "wav", "flac", "mp3", "opus", "aac")
_PYAV = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac")}  # container, encoder


def to_pcm16(samples: np.ndarray) -> bytes:
    """Raw little-endian 16-bit samples; values beyond [-1, 1] are clipped."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def pcm16_base64(samples: np.ndarray) -> str:
    return base64.b64encode(to_pcm16(samples)).decode("ascii")


def encode(samples: np.ndarray, format: str) -> bytes:
    """A whole file (or raw pcm16) in `format`, one of FORMATS; mono at SAMPLE_RATE."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if format == "pcm16":
        return to_pcm16(samples)
    if format in ("wav", "flac"):
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, SAMPLE_RATE, subtype="PCM_16", format=format.upper())
        return buffer.getvalue()
    if format in _PYAV:
        return _encode_pyav(samples, *_PYAV[format])
    raise ValueError(f"unsupported audio format {format!r}; use one of {', '.join(FORMATS)}")


def _encode_pyav(samples: np.ndarray, container: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=SAMPLE_RATE, layout="mono")
        if len(samples):
            frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            out.mux(stream.encode(frame))  # PyAV resamples to the encoder's format and cuts its frame size
        out.mux(stream.encode(None))
    return buffer.getvalue()
