"""Realtime GA wire format: client events parsed and validated into models, server events built as dicts."""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnitalk.server.limits import JSONError, load_json

SAMPLE_RATE = 24_000  # the only rate of audio/pcm, in and out
PCM = {"type": "audio/pcm", "rate": SAMPLE_RATE}

# Every server event type this server sends: pipecat ends its session on any type missing from its table,
# so nothing outside it (no beta names, no custom events) may go out.
SERVER_EVENTS = frozenset(
    {
        "error",
        "session.created",
        "session.updated",
        "input_audio_buffer.committed",
        "input_audio_buffer.cleared",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.truncated",
        "conversation.item.deleted",
        "conversation.item.retrieved",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
        "conversation.item.input_audio_transcription.failed",
        "response.created",
        "response.done",
        "response.output_item.added",
        "response.output_item.done",
        "response.content_part.added",
        "response.content_part.done",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_audio_transcript.delta",
        "response.output_audio_transcript.done",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    }
)


class ClientError(Exception):
    """A client event this server refuses; it becomes an `error` event and the session goes on."""

    def __init__(
        self,
        message: str,
        code: str | None = "invalid_value",
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type
        self.event_id: str | None = None  # the offending client event's, once known


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def event(type: str, **fields: Any) -> dict[str, Any]:
    """A server event with a unique event_id."""
    assert type in SERVER_EVENTS, type
    return {"event_id": new_id("event"), "type": type, **fields}


def error_event(error: ClientError) -> dict[str, Any]:
    body = {"type": error.type, "code": error.code, "message": error.message, "param": error.param}
    return event("error", error={**body, "event_id": error.event_id})


def decode_pcm16(data: str, param: str) -> bytes:
    """Raw pcm16 bytes from base64; whole 16-bit samples only."""
    try:
        pcm = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ClientError(f"the audio is not valid base64: {error}", param=param) from error
    if len(pcm) % 2:
        raise ClientError(f"pcm16 audio must hold whole 16-bit samples; got {len(pcm)} bytes", param=param)
    return pcm


# Client-event models. Unknown fields are refused (OpenAI does the same); fields that this server accepts but has
# no use for (tools, tracing, transcription, ...) are typed Any, kept and echoed, and documented in docs/server.md.


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AudioFormat(_Model):
    type: str
    rate: int | None = None

    @model_validator(mode="after")
    def _pcm_24k(self) -> AudioFormat:
        if self.type != "audio/pcm" or self.rate not in (None, SAMPLE_RATE):
            raise ValueError(f"unsupported audio format {self.model_dump(exclude_none=True)}; only {PCM} is served")
        return self


class ServerVad(_Model):
    type: Literal["server_vad"]
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=10_000)
    silence_duration_ms: int = Field(500, ge=32, le=10_000)
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None

    @model_validator(mode="after")
    def _no_idle_timeout(self) -> ServerVad:
        if self.idle_timeout_ms is not None:  # its input_audio_buffer.timeout_triggered would break pipecat
            raise ValueError("idle_timeout_ms is not supported; leave it null")
        return self


class SemanticVad(_Model):
    """Served by the same acoustic VAD: eagerness only picks the silence that ends a turn."""

    type: Literal["semantic_vad"]
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    create_response: bool = True
    interrupt_response: bool = True


TurnDetection = Annotated[ServerVad | SemanticVad, Field(discriminator="type")]


class AudioInput(_Model):
    format: AudioFormat | None = None
    turn_detection: TurnDetection | None = None
    transcription: Any = None  # any value but null: committed audio is transcribed by the served thinker
    noise_reduction: Any = None  # not served


class AudioOutput(_Model):
    format: AudioFormat | None = None
    voice: str | None = None
    speed: float | None = None

    @model_validator(mode="after")
    def _normal_speed(self) -> AudioOutput:
        if self.speed is not None and self.speed != 1.0:
            raise ValueError("only speed 1.0 is served")
        return self


class SessionAudio(_Model):
    input: AudioInput | None = None
    output: AudioOutput | None = None


Modalities = Annotated[list[Literal["text", "audio"]], Field(min_length=1)]


class FunctionTool(_Model):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class NamedFunction(_Model):
    type: Literal["function"]
    name: str


ToolChoiceParam = Literal["auto", "none", "required"] | NamedFunction


class RetentionRatio(_Model):
    type: Literal["retention_ratio"]
    retention_ratio: float = Field(ge=0.0, le=1.0)


TruncationParam = Literal["auto", "disabled"] | RetentionRatio


def _max_tokens(value: int | str) -> int | str:
    if value != "inf" and not (isinstance(value, int) and value >= 1):
        raise ValueError('max_output_tokens is a positive integer or "inf"')
    return value


MaxTokens = Annotated[int | str, AfterValidator(_max_tokens)]


class Session(_Model):
    """A session.update's `session`: only the fields present change (model_fields_set)."""

    type: Literal["realtime"]
    output_modalities: Modalities | None = None
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    audio: SessionAudio | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # the beta's; GA dropped it
    model: str | None = None  # fixed by the server
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoiceParam | None = None
    # Accepted and echoed, without effect: no tracing, prompts or reasoning here.
    truncation: TruncationParam | None = None
    tracing: Any = None
    prompt: Any = None
    include: Any = None
    parallel_tool_calls: Any = None
    reasoning: Any = None
    object: Any = None
    id: Any = None
    expires_at: Any = None


class ContentPart(_Model):
    type: Literal["input_text", "input_audio", "input_image", "output_text", "output_audio", "text", "audio"]
    text: str | None = None
    audio: str | None = None  # base64 pcm16, 24 kHz
    transcript: str | None = None
    image_url: str | None = None  # a data: URL
    detail: Any = None


class Item(_Model):
    type: Literal["message", "function_call", "function_call_output", "item_reference"]
    id: str | None = Field(None, max_length=64)
    object: Literal["realtime.item"] | None = None
    status: Any = None
    role: Literal["user", "assistant", "system"] | None = None
    content: list[ContentPart] | None = None
    call_id: str | None = Field(None, max_length=64)
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ResponseAudioOutput(_Model):
    format: AudioFormat | None = None
    voice: str | None = None


class ResponseAudio(_Model):
    output: ResponseAudioOutput | None = None


class ResponseParams(_Model):
    output_modalities: Modalities | None = None
    instructions: str | None = None
    audio: ResponseAudio | None = None
    conversation: str = "auto"  # "auto" or "none"; named conversations do not exist here
    input: list[Item] | None = None
    metadata: dict[str, str] | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoiceParam | None = None
    prompt: Any = None
    parallel_tool_calls: Any = None
    reasoning: Any = None


class _Event(_Model):
    type: str
    event_id: str | None = None


class SessionUpdate(_Event):
    session: Session


class BufferAppend(_Event):
    audio: str


class BufferCommit(_Event):
    pass


class BufferClear(_Event):
    pass


class ItemCreate(_Event):
    item: Item
    previous_item_id: str | None = None


class ItemTruncate(_Event):
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ItemDelete(_Event):
    item_id: str


class ItemRetrieve(_Event):
    item_id: str


class ResponseCreate(_Event):
    response: ResponseParams | None = None


class ResponseCancel(_Event):
    response_id: str | None = None


CLIENT_EVENTS: dict[str, type[_Event]] = {
    "session.update": SessionUpdate,
    "input_audio_buffer.append": BufferAppend,
    "input_audio_buffer.commit": BufferCommit,
    "input_audio_buffer.clear": BufferClear,
    "conversation.item.create": ItemCreate,
    "conversation.item.truncate": ItemTruncate,
    "conversation.item.delete": ItemDelete,
    "conversation.item.retrieve": ItemRetrieve,
    "response.create": ResponseCreate,
    "response.cancel": ResponseCancel,
}
ClientEvent = (
    SessionUpdate
    | BufferAppend
    | BufferCommit
    | BufferClear
    | ItemCreate
    | ItemTruncate
    | ItemDelete
    | ItemRetrieve
    | ResponseCreate
    | ResponseCancel
)


def parse(message: str | bytes) -> ClientEvent:
    """One client event from a frame's text; ClientError (with the event's event_id when it has one) if invalid."""
    try:
        data = load_json(message)
    except JSONError as error:
        raise ClientError(f"the message is not valid JSON: {error}", code="invalid_json") from error
    if not isinstance(data, dict):
        raise ClientError("a client event must be a JSON object", code="invalid_json")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    try:
        if not isinstance(kind, str):
            raise ClientError("the event has no string 'type'", code="missing_required_parameter", param="type")
        if kind not in CLIENT_EVENTS:
            raise ClientError(
                f"unknown or unsupported event type {kind!r}; this server takes {', '.join(CLIENT_EVENTS)}",
                code="invalid_event_type",
                param="type",
            )
        try:
            return CLIENT_EVENTS[kind].model_validate(data)  # type: ignore[return-value]
        except ValidationError as error:
            raise from_validation(error) from None
    except ClientError as error:
        error.event_id = event_id
        raise


_UNION_TAGS = ("server_vad", "semantic_vad", "int", "str", "literal['auto','none','required']", "NamedFunction")
_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}


def from_validation(error: ValidationError) -> ClientError:
    """The first problem pydantic found, with OpenAI's codes and a dotted `param`."""
    first = error.errors(include_url=False)[0]
    # Drop the union tags pydantic puts in locations (e.g. 'server_vad' or 'function-after[...]').
    loc = [str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    param = ".".join(loc) or None
    kind = first["type"]
    if kind == "extra_forbidden":
        message = f"unknown parameter {param!r}"
    elif kind == "missing":
        message = f"missing required parameter {param!r}"
    else:
        message = f"invalid {param or 'event'}: {first['msg'].removeprefix('Value error, ')}"
    return ClientError(message, code=_CODES.get(kind, "invalid_value"), param=param)
