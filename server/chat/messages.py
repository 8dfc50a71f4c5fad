"""Chat messages to the engine's conversation: media decoded (data only: nothing is fetched), history resolved."""

from __future__ import annotations

import base64
import binascii
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from omnitalk.engine import media
from omnitalk.engine.request import Audio, Image, Message, Part, Text
from omnitalk.engine.thinker.prompt import SPEECH_SYSTEM_PROMPT
from omnitalk.server import tools
from omnitalk.server.chat import protocol as p
from omnitalk.server.context import prompt_size
from omnitalk.server.errors import APIError


class TranscriptCache:
    """Transcripts of recent spoken answers by audio id, so a client may send back `{"audio": {"id": ...}}`
    alone as OpenAI allows. Bounded: the oldest entries go first; expired entries are gone."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def put(self, audio_id: str, transcript: str, expires_at: float) -> None:
        self._entries[audio_id] = (transcript, expires_at)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, audio_id: str) -> str | None:
        transcript, expires_at = self._entries.get(audio_id, (None, 0.0))
        if transcript is not None and time.time() >= expires_at:
            del self._entries[audio_id]
            return None
        return transcript


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    num_text_tokens: int  # the prompt's tokens other than media placeholders' expansions
    num_audio_tokens: int  # the audio encoder's output tokens for the input audio


def convert(
    request: p.ChatCompletionRequest, transcripts: TranscriptCache, tokenizer: Any, max_audio_seconds: float
) -> Conversation:
    """The engine's conversation for `request` (decodes media: run it in a worker thread)."""
    options = request.omnitalk
    messages: list[Message] = []
    results: list[str] = []  # consecutive tool messages: one user turn
    for i, m in enumerate(request.messages):
        if isinstance(m, p.ToolMessage):
            results.append(_text(m.content))
            continue
        if results:
            messages.append(Message("user", (Text(tools.response_text(results)),)))
            results = []
        messages.append(_message(i, m, options, transcripts, max_audio_seconds))
    if results:
        messages.append(Message("user", (Text(tools.response_text(results)),)))
    if request.wants_audio and not any(m.role == "system" for m in messages):
        messages.insert(0, Message("system", (Text(SPEECH_SYSTEM_PROMPT),)))
    messages = tools.with_tools(tuple(messages), request.tool_set)
    size = prompt_size(messages, tokenizer, options.use_audio_in_video)
    return Conversation(messages, size.text_tokens, size.audio_tokens)


def prompt_details(conversation: Conversation, prompt_tokens: int) -> dict[str, int]:
    """The engine's prompt-token count split by kind; image tokens include video frames."""
    text = min(conversation.num_text_tokens, prompt_tokens)
    audio = min(conversation.num_audio_tokens, prompt_tokens - text)
    return {"total": prompt_tokens, "text": text, "audio": audio, "image": prompt_tokens - text - audio}


def _message(
    i: int, message: Any, options: p.OmnitalkOptions, transcripts: TranscriptCache, max_audio_seconds: float
) -> Message:
    if isinstance(message, p.SystemMessage):
        return Message("system", (Text(_text(message.content)),))
    if isinstance(message, p.AssistantMessage):
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]
        return Message("assistant", (Text(tools.assistant_text(_assistant_text(i, message, transcripts), calls)),))
    if isinstance(message.content, str):
        return Message("user", (Text(message.content),))
    parts = []
    for j, part in enumerate(message.content):
        with _part_errors(f"messages[{i}].content[{j}]"):
            parts.append(_user_part(part, options, max_audio_seconds))
    return Message("user", tuple(parts))


def _text(content: str | list) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text if isinstance(part, p.TextPart) else part.refusal for part in content)


def _assistant_text(i: int, message: p.AssistantMessage, transcripts: TranscriptCache) -> str:
    if message.content:
        return _text(message.content)
    if message.audio is None:
        return ""
    transcript = transcripts.get(message.audio.id)
    if transcript is None:
        raise APIError(
            f"messages[{i}].audio.id: no answer with audio id {message.audio.id!r} is known: this server keeps the "
            f"transcripts of recent answers only until they expire (1 hour); send the assistant's words as content",
            param=f"messages[{i}].audio.id",
        )
    return transcript


@contextmanager
def _part_errors(where: str) -> Iterator[None]:
    try:
        yield
    except media.MediaError as error:
        raise APIError(f"{where}: {error}", param=where) from error
    except APIError as error:
        param = f"{where}.{error.param}" if error.param else where
        raise APIError(f"{where}.{error.message}", param=param, code=error.code) from error


def _user_part(part: Any, options: p.OmnitalkOptions, max_audio_seconds: float) -> Part:
    match part:
        case p.TextPart(text=text):
            return Text(text)
        case p.InputAudioPart(input_audio=audio):
            data = _data_url(audio.data, "audio/")[1] if audio.data.startswith("data:") else _base64(audio.data)
            rate = options.input_audio_sample_rate
            samples = media.load_audio(data, format=audio.format, sample_rate=rate, max_seconds=max_audio_seconds)
            return Audio(_short_enough(samples, max_audio_seconds, "input_audio"))
        case p.AudioURLPart(audio_url=url):
            data = _data_url(url.url, "audio/", "audio_url.url")[1]
            return Audio(
                _short_enough(media.load_audio(data, max_seconds=max_audio_seconds), max_audio_seconds, "audio_url")
            )
        case p.ImagePart(image_url=url):
            return Image(media.load_image(_data_url(url.url, "image/", "image_url.url")[1]))
        case p.VideoPart(video_url=url):
            with_audio = options.use_audio_in_video
            data = _data_url(url.url, "video/", "video_url.url")[1]
            video = media.load_video(data, with_audio=with_audio, max_seconds=max_audio_seconds)
            if video.audio is not None:
                _short_enough(video.audio, max_audio_seconds, "video_url")
            return video
    raise APIError(f"unsupported content part {type(part).__name__}")


def _base64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(f"input_audio.data: not valid base64 ({error})", param="input_audio.data") from error


def _data_url(url: str, kind: str, field: str = "input_audio.data") -> tuple[str, bytes]:
    if url.startswith(("http://", "https://", "file:", "ftp:")):
        raise APIError(
            f"{field}: this server fetches nothing: send the media inline as a base64 data: URL "
            f"(data:{kind}...;base64,...), not {url.split(':', 1)[0]} URLs",
            param=field,
            code="invalid_url",
        )
    try:
        mime, data = media.decode_data_url(url)
    except media.MediaError as error:
        raise APIError(f"{field}: {error}", param=field, code="invalid_url") from error
    if not mime.startswith(kind):
        raise APIError(f"{field}: expected a data: URL of type {kind}*, got {mime}", param=field)
    return mime, data


def _short_enough(samples: np.ndarray, max_seconds: float, what: str) -> np.ndarray:
    seconds = len(samples) / media.SAMPLE_RATE
    if seconds > max_seconds:
        raise APIError(f"{what}: the audio lasts {seconds:.1f} s; this server takes at most {max_seconds:g} s")
    return samples
