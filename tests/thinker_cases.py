"""Conversations for every input kind, built from synthetic media, in engine form and in the oracle's form."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from omnitalk.engine.media import SAMPLE_RATE, VIDEO_FPS, Video
from omnitalk.engine.request import Audio, Image, Message, Part, Text


def tone(seconds: float, hz: float = 220.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.random.default_rng(seed).normal(0, 0.05, t.shape)
    return (0.4 * np.sin(2 * np.pi * hz * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.7 * t)) + noise).astype(np.float32)


def picture(width: int, height: int, seed: int = 0) -> PILImage.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PILImage.fromarray(pixels)


def clip(seconds: float, size: int = 112, soundtrack_seconds: float | None = None) -> Video:
    frames = np.stack([np.asarray(picture(size, size, seed=i)) for i in range(int(seconds * VIDEO_FPS))])
    audio = tone(soundtrack_seconds, hz=330.0) if soundtrack_seconds else None
    return Video(frames=frames, fps=VIDEO_FPS, audio=audio)


@dataclass(frozen=True)
class Case:
    messages: tuple[Message, ...]
    use_audio_in_video: bool = False


def user(*parts: Part) -> tuple[Message, ...]:
    return (Message("user", parts),)


CASES = {
    "text-short": Case(user(Text("Hello, world!"))),
    "text-long": Case(
        (
            Message("system", (Text("You are a helpful assistant."),)),
            Message("user", (Text("Tell me a story about a lighthouse keeper and a storm. " * 6),)),
        )
    ),
    "audio-3s": Case(user(Audio(tone(3.0)), Text("What do you hear?"))),
    "audio-45s": Case(user(Audio(tone(45.0, seed=1)), Text("Summarise the recording."))),
    "image": Case(user(Image(picture(224, 168)), Text("Describe the picture."))),
    "video": Case(user(clip(4.0), Text("What happens in the video?"))),
    "audio-in-video": Case(user(clip(4.0, soundtrack_seconds=4.0), Text("What is said?")), use_audio_in_video=True),
}


def reference_conversation(messages: tuple[Message, ...], use_audio_in_video: bool) -> list[dict]:
    """The same conversation in the oracle's format (see oracle.Reference)."""

    def part(p: Part) -> dict:
        match p:
            case Text(text):
                return {"type": "text", "text": text}
            case Audio(samples):
                return {"type": "audio", "audio": samples}
            case Image(image):
                return {"type": "image", "image": image}
            case Video():
                video = {"type": "video", "video": p.frames}
                return video | ({"video_audio": p.audio} if use_audio_in_video else {})
        raise TypeError(p)

    return [{"role": m.role, "content": [part(p) for p in m.content]} for m in messages]
