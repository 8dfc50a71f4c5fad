"""One Realtime session's state: its configuration, the input audio buffer, the conversation, the live response."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage

from omnitalk.engine import media
from omnitalk.engine.request import Audio, Image, Message, Part, Text
from omnitalk.engine.thinker.prompt import SPEECH_SYSTEM_PROMPT
from omnitalk.server import speech
from omnitalk.server.realtime import protocol as p
from omnitalk.server.realtime.input_audio import Resampled
from omnitalk.server.realtime.protocol import SAMPLE_RATE, ClientError
from omnitalk.server.realtime.vad import EAGERNESS_SILENCE_MS, TurnDetector
from omnitalk.server.tools import Function, ToolChoice, Tools, call_text, response_text

if TYPE_CHECKING:
    from omnitalk.server.realtime.response import LiveResponse

_EXTRAS = ("tracing", "prompt", "include", "parallel_tool_calls", "reasoning")


def tool_set(tools: list[dict[str, Any]], choice: str | dict[str, Any], param: str) -> Tools:
    """The functions and the choice, as a session or response gives them (their JSON); ClientError if the choice
    names a function that is not offered."""
    functions = tuple(Function(t["name"], t.get("description"), t.get("parameters")) for t in tools)
    if isinstance(choice, dict):
        if choice["name"] not in {f.name for f in functions}:
            raise ClientError(f"tool_choice names {choice['name']!r}, which is not among the tools", param=param)
        return Tools(functions, ToolChoice("function", choice["name"]))
    return Tools(functions, ToolChoice(choice))  # type: ignore[arg-type]


def tools_json(tools: list[p.FunctionTool] | None, choice: p.ToolChoiceParam | None) -> dict[str, Any]:
    """The tool fields given, as echoed (plain JSON)."""
    fields: dict[str, Any] = {}
    if tools is not None:
        fields["tools"] = [t.model_dump(exclude_none=True) for t in tools]
    if choice is not None:
        fields["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
    return fields


def resolve_voice(voice: str, voices: list[str], param: str) -> str:
    try:
        return speech.resolve_voice(voice, voices)
    except ValueError as error:
        raise ClientError(str(error), param=param) from error


@dataclass(slots=True)
class SessionConfig:
    model: str
    voice: str  # as the client named it; resolved to the checkpoint's per response
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    instructions: str = SPEECH_SYSTEM_PROMPT
    max_output_tokens: int | str = "inf"
    temperature: float = 0.8  # OpenAI's Realtime default
    turn_detection: p.ServerVad | p.SemanticVad | None = field(default_factory=lambda: p.ServerVad(type="server_vad"))
    transcription: Any = None
    noise_reduction: Any = None
    tools: list[dict[str, Any]] = field(default_factory=list)  # as given (FunctionTool's JSON)
    tool_choice: str | dict[str, Any] = "auto"
    truncation: str | dict[str, Any] = "auto"  # as given: "auto", "disabled" or a retention_ratio object
    extras: dict[str, Any] = field(default_factory=lambda: {"tracing": None})

    def updated(self, update: p.Session, voices: list[str]) -> SessionConfig:
        """A new config with the update's fields applied; the old one is untouched if anything is invalid."""
        given = update.model_fields_set
        changes = {k: getattr(update, k) for k in _SIMPLE_FIELDS if k in given and getattr(update, k) is not None}
        extras = {**self.extras, **{k: getattr(update, k) for k in given if k in _EXTRAS}}
        changes |= tools_json(update.tools, update.tool_choice)
        if update.truncation is not None:
            truncation = update.truncation
            changes["truncation"] = truncation if isinstance(truncation, str) else truncation.model_dump()
        tool_set(changes.get("tools", self.tools), changes.get("tool_choice", self.tool_choice), "session.tool_choice")
        audio = update.audio
        if audio is not None and audio.input is not None:
            changes |= {k: getattr(audio.input, k) for k in audio.input.model_fields_set if k != "format"}
        if audio is not None and audio.output is not None and audio.output.voice is not None:
            resolve_voice(audio.output.voice, voices, "session.audio.output.voice")
            changes["voice"] = audio.output.voice
        return dataclasses.replace(self, **changes, extras=extras)

    @property
    def retention(self) -> float | None:
        """What truncation keeps of the room after the instructions: 1.0 for "auto", None when it is disabled."""
        if isinstance(self.truncation, dict):
            return self.truncation["retention_ratio"]
        return None if self.truncation == "disabled" else 1.0

    def vad(self, position_24k: int) -> TurnDetector | None:
        """A fresh detector for the current turn detection, starting at the given point of the input timeline."""
        td = self.turn_detection
        if td is None:
            return None
        if isinstance(td, p.SemanticVad):
            return TurnDetector(silence_duration_ms=EAGERNESS_SILENCE_MS[td.eagerness], position=position_24k * 2 // 3)
        return TurnDetector(td.threshold, td.prefix_padding_ms, td.silence_duration_ms, position=position_24k * 2 // 3)

    def to_json(self, session_id: str) -> dict[str, Any]:
        turn = None if self.turn_detection is None else self.turn_detection.model_dump()
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": self.model,
            "output_modalities": self.output_modalities,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "audio": {
                "input": {
                    "format": p.PCM,
                    "transcription": self.transcription,
                    "noise_reduction": self.noise_reduction,
                    "turn_detection": turn,
                },
                "output": {"format": p.PCM, "voice": self.voice, "speed": 1.0},
            },
            "tools": self.tools,
            "tool_choice": self.tool_choice,
            "truncation": self.truncation,
            **self.extras,
        }


_SIMPLE_FIELDS = ("output_modalities", "instructions", "max_output_tokens", "temperature")


@dataclass(slots=True)
class ItemPart:
    type: str  # input_text | input_audio | input_image | output_text | output_audio
    text: str | None = None  # the text, or an audio part's transcript (None: unknown)
    samples: np.ndarray | None = None  # input_audio: float32 at 16 kHz, as the thinker takes it
    image: PILImage.Image | None = None
    audio_ms: float = 0.0  # output_audio: how much audio the client got; what truncation may keep

    def to_json(self) -> dict[str, Any]:
        if self.type in ("input_text", "output_text"):
            return {"type": self.type, "text": self.text or ""}
        if self.type == "input_image":
            return {"type": self.type}
        return {"type": self.type, "transcript": self.text}  # audio bytes are never echoed

    def engine_part(self) -> Part | None:
        if self.samples is not None:
            return Audio(self.samples)
        if self.image is not None:
            return Image(self.image)
        return Text(self.text) if self.text else None


@dataclass(slots=True)
class Item:
    id: str
    role: str  # a message's; function calls are the assistant's, their outputs the user's
    parts: list[ItemPart]
    status: str = "completed"
    type: str = "message"  # message | function_call | function_call_output
    call_id: str | None = None
    name: str | None = None  # function_call: the function
    arguments: str = ""  # function_call: a JSON text
    output: str = ""  # function_call_output

    def to_json(self) -> dict[str, Any]:
        head = {"id": self.id, "object": "realtime.item", "type": self.type, "status": self.status}
        if self.type == "function_call":
            return {**head, "call_id": self.call_id, "name": self.name, "arguments": self.arguments}
        if self.type == "function_call_output":
            return {**head, "call_id": self.call_id, "output": self.output}
        return {**head, "role": self.role, "content": [part.to_json() for part in self.parts]}

    def message(self) -> Message | None:
        if self.type == "function_call":
            return Message("assistant", (Text(call_text(self.name or "", self.arguments)),))
        if self.type == "function_call_output":
            return Message("user", (Text(response_text([self.output])),))
        parts = tuple(q for q in (part.engine_part() for part in self.parts) if q is not None)
        return Message(self.role, parts) if parts else None  # type: ignore[arg-type]


def conversation_messages(items: tuple[Item, ...]) -> list[Message]:
    """The items as the thinker's turns: as in Qwen2.5's template, an answer's calls join its words in one assistant
    turn and consecutive call outputs make one user turn."""
    messages: list[Message] = []
    previous: Item | None = None
    for item in items:
        message = item.message()
        if message is None:
            continue
        joins = previous is not None and (
            (item.type == "function_call" and previous.role == "assistant")
            or (item.type == "function_call_output" and previous.type == "function_call_output")
        )
        if joins and _text_only(messages[-1]):
            text = messages[-1].content[0].text + "\n" + message.content[0].text  # type: ignore[union-attr]
            messages[-1] = Message(item.role, (Text(text),))  # type: ignore[arg-type]
        else:
            messages.append(message)
        previous = item
    return messages


def _text_only(message: Message) -> bool:
    return len(message.content) == 1 and isinstance(message.content[0], Text)


def user_audio_item(item_id: str, samples: np.ndarray, max_seconds: float) -> Item:
    """The item a committed buffer becomes (its 16 kHz samples, `InputBuffer.take`'s)."""
    seconds = len(samples) / 16_000
    if seconds > max_seconds:
        raise ClientError(f"the audio lasts {seconds:.1f} s; at most {max_seconds:g} s is accepted", param="audio")
    return Item(item_id, "user", [ItemPart("input_audio", samples=samples)])


def build_item(item: p.Item, max_seconds: float) -> Item:
    """A conversation item from a client's (blocking: decodes media). ClientError if it cannot be used."""
    item_id = item.id or p.new_id("item")
    if item.type == "function_call":
        if not item.name:
            raise ClientError("a function_call item needs name", code="missing_required_parameter", param="item.name")
        call_id = item.call_id or p.new_id("call")
        return Item(item_id, "assistant", [], type="function_call", call_id=call_id, name=item.name,
                    arguments=item.arguments or "")  # fmt: skip
    if item.type == "function_call_output":
        if item.call_id is None or item.output is None:
            missing = "item.call_id" if item.call_id is None else "item.output"
            raise ClientError(f"a function_call_output item needs {missing}", "missing_required_parameter", missing)
        return Item(item_id, "user", [], type="function_call_output", call_id=item.call_id, output=item.output)
    if item.type != "message":
        raise ClientError(f"{item.type} items are only allowed in response.input", param="item.type")
    if item.role is None or not item.content:
        missing = "item.role" if item.role is None else "item.content"
        raise ClientError(f"a message item needs {missing}", code="missing_required_parameter", param=missing)
    parts = [_part(item.role, c, max_seconds, f"item.content[{i}]") for i, c in enumerate(item.content)]
    return Item(item_id, item.role, parts)


_ALIASES = {
    "user": {"text": "input_text"},
    "system": {"text": "input_text"},
    "assistant": {"text": "output_text", "audio": "output_audio"},
}
_ALLOWED = {
    "user": ("input_text", "input_audio", "input_image"),
    "system": ("input_text",),
    "assistant": ("output_text", "output_audio"),
}


def _part(role: str, c: p.ContentPart, max_seconds: float, where: str) -> ItemPart:
    kind = _ALIASES[role].get(c.type, c.type)
    if kind not in _ALLOWED[role]:
        raise ClientError(f"{role} items take {', '.join(_ALLOWED[role])} content, not {c.type}", param=f"{where}.type")
    if kind in ("input_text", "output_text"):
        if c.text is None:
            raise ClientError(f"{kind} content needs text", code="missing_required_parameter", param=f"{where}.text")
        return ItemPart(kind, c.text)
    if kind == "input_audio":
        if c.audio is None:
            raise ClientError(
                "input_audio content needs audio", code="missing_required_parameter", param=f"{where}.audio"
            )
        pcm = p.decode_pcm16(c.audio, f"{where}.audio")
        return ItemPart(kind, c.transcript, samples=_decode(pcm, max_seconds, f"{where}.audio"))
    if kind == "input_image":
        try:
            _, data = media.decode_data_url(c.image_url or "")
            return ItemPart(kind, image=media.load_image(data))
        except media.MediaError as error:
            raise ClientError(f"input_image: {error}", param=f"{where}.image_url") from error
    # output_audio: only the transcript reaches the thinker; the audio, if sent, bounds truncation
    audio_ms = len(p.decode_pcm16(c.audio, f"{where}.audio")) / 2 / SAMPLE_RATE * 1000 if c.audio else 0.0
    return ItemPart(kind, c.transcript or "", audio_ms=audio_ms)


def _decode(pcm: bytes, max_seconds: float, param: str) -> np.ndarray:
    seconds = len(pcm) / 2 / SAMPLE_RATE
    if seconds > max_seconds:
        raise ClientError(f"the audio lasts {seconds:.1f} s; at most {max_seconds:g} s is accepted", param=param)
    try:
        return media.load_audio(pcm, format=media.PCM16, sample_rate=SAMPLE_RATE)
    except media.MediaError as error:
        raise ClientError(str(error), param=param) from error


@dataclass(slots=True)
class Conversation:
    items: list[Item] = field(default_factory=list)

    def find(self, item_id: str, param: str = "item_id", action: str | None = None) -> Item:
        """The item; ClientError if unknown, with OpenAI's code for the action that asked (retrieve, delete, ...)."""
        for item in self.items:
            if item.id == item_id:
                return item
        code = f"item_{action}_invalid_item_id" if action else "item_not_found"
        raise ClientError(f"no item with id {item_id!r} in the conversation", code=code, param=param)

    def insert(self, item: Item, previous_item_id: str | None = None) -> str | None:
        """Adds `item` after `previous_item_id` ("root": first; None: last); returns the id now before it."""
        if any(i.id == item.id for i in self.items):
            raise ClientError(f"an item with id {item.id!r} already exists", code="item_id_taken", param="item.id")
        if previous_item_id is None:
            index = len(self.items)
        elif previous_item_id == "root":
            index = 0
        else:
            index = self.items.index(self.find(previous_item_id, "previous_item_id")) + 1
        self.items.insert(index, item)
        return self.items[index - 1].id if index else None

    def remove(self, item_id: str) -> None:
        self.items.remove(self.find(item_id, action="delete"))

    @property
    def last_id(self) -> str | None:
        return self.items[-1].id if self.items else None


@dataclass(slots=True)
class InputBuffer:
    """pcm16 at 24 kHz, with its place on the session's input timeline (every sample ever appended), and its audio
    at 16 kHz, resampled as it arrives (`input_audio`: what a committed item holds and a turn ingests)."""

    pcm: bytearray = field(default_factory=bytearray)
    start: int = 0  # timeline sample index of pcm[0]
    audio: Resampled = field(default_factory=Resampled)
    origin: int = 0  # timeline sample index where `audio` starts

    @property
    def end(self) -> int:
        return self.start + len(self.pcm) // 2

    def index(self, position: int) -> int:
        """The 16 kHz output index of a timeline position."""
        return round((position - self.origin) * 2 / 3)

    def append(self, pcm: bytes) -> None:
        self.pcm += pcm
        self.audio.push(pcm)

    def _cut(self, until_ms: int | None) -> int:
        return len(self.pcm) if until_ms is None else min(len(self.pcm), max(0, until_ms * 24 - self.start) * 2)

    def take(self, until_ms: int | None = None) -> np.ndarray:
        """Removes the audio up to `until_ms` on the timeline (everything if None) and returns it at 16 kHz: the
        resampled stream's samples; what stays is resampled afresh (blocking)."""
        cut = self._cut(until_ms)
        self.audio.flush()
        begin = self.index(self.start)
        end = self.audio.produced if cut == len(self.pcm) else self.index(self.start + cut // 2)
        samples = self.audio.slice(begin, end)
        del self.pcm[:cut]
        self.start += cut // 2
        self.audio, self.origin = Resampled(), self.start
        self.audio.push(bytes(self.pcm))
        return samples

    def keep_from(self, ms: int) -> None:
        """Drops audio before `ms` on the timeline (what server VAD will never commit)."""
        cut = self._cut(ms)
        del self.pcm[:cut]
        self.start += cut // 2
        self.audio.drop_before(self.index(self.start))


@dataclass(slots=True)
class RealtimeSession:
    id: str
    config: SessionConfig
    conversation_id: str = field(default_factory=lambda: p.new_id("conv"))
    buffer: InputBuffer = field(default_factory=InputBuffer)
    conversation: Conversation = field(default_factory=Conversation)
    vad: TurnDetector | None = None
    turn_item_id: str | None = None  # announced by speech_started, used by the commit that ends the turn
    response: LiveResponse | None = None

    def __post_init__(self) -> None:
        self.vad = self.config.vad(self.buffer.end)
