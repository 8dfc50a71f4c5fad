"""What a caller asks the engine for: a conversation of decoded media and text, and how to sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image as PILImage

from omnitalk.engine.media import Video


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Audio:
    samples: np.ndarray  # float32 mono at media.SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class Image:
    image: PILImage.Image


Part = Text | Audio | Image | Video


@dataclass(frozen=True, slots=True)
class Message:
    role: Literal["system", "user", "assistant"]
    content: tuple[Part, ...]


@dataclass(frozen=True, slots=True)
class Sampling:
    """Thinker sampling; temperature 0 is greedy."""

    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: str | None = None  # the output is JSON valid against this schema (vLLM's structured outputs)


@dataclass(frozen=True, slots=True)
class ThinkerRequest:
    request_id: str
    messages: tuple[Message, ...]
    sampling: Sampling = field(default_factory=Sampling)
    use_audio_in_video: bool = False  # interleave each video's soundtrack with its frames (2 s chunks)
    hidden_states: bool = False  # stream every position's last-layer hidden state (requests that speak)
    # The conversation (a Realtime session) whose earlier requests' thinker state this one may reuse: the prefix
    # cache under the session's salt and its rows (`thinker/conversation.py`); None: nothing is shared.
    session: str | None = None
