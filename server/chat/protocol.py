"""Chat Completions request and response models (OpenAI's field names); options omnitalk cannot honour are refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnitalk.server.errors import APIError
from omnitalk.server.limits import JSONError, load_json
from omnitalk.server.tools import Function, ToolChoice, Tools

OUTPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "opus", "aac", "pcm16")
# OpenAI takes wav and mp3; the rest are what engine/media.py decodes. pcm16 is raw s16le mono, 24 kHz by default.
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "webm", "m4a", "mp4", "aac", "pcm16")


MIN_PCM16_RATE, MAX_PCM16_RATE = 1_000, 384_000  # raw audio outside this range is not speech


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as OpenAI: fields it does not know are ignored


# Content parts.
class TextPart(_Model):
    type: Literal["text"]
    text: str


class RefusalPart(_Model):
    type: Literal["refusal"]
    refusal: str


class InputAudio(_Model):
    data: str  # base64 (a data: URL is accepted too)
    format: Literal[INPUT_AUDIO_FORMATS]  # type: ignore[valid-type]


class InputAudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


class MediaURL(_Model):
    url: str
    detail: str | None = None  # the thinker takes images at its own resolution rule: ignored


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: MediaURL


class AudioURLPart(_Model):  # vLLM's extension
    type: Literal["audio_url"]
    audio_url: MediaURL


class VideoPart(_Model):  # vLLM's extension
    type: Literal["video_url"]
    video_url: MediaURL


UserPart = Annotated[TextPart | InputAudioPart | ImagePart | AudioURLPart | VideoPart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


# Messages.
class SystemMessage(_Model):
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(_Model):
    role: Literal["user"]
    content: str | list[UserPart]


class AudioRef(_Model):
    id: str


class CalledFunction(_Model):
    name: str
    arguments: str  # a JSON text, as the model wrote it


class ToolCallRef(_Model):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    audio: AudioRef | None = None
    tool_calls: list[ToolCallRef] | None = None


class ToolMessage(_Model):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionDef(_Model):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # calls always match the schema when they are forced; "auto" ones are parsed


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class AudioOutput(_Model):
    voice: str | dict[str, Any]  # a name, or OpenAI's {"id": "voice_..."} for custom voices (refused)
    format: Literal[OUTPUT_AUDIO_FORMATS]  # type: ignore[valid-type]


class StreamOptions(_Model):
    include_usage: bool = False


class OmnitalkOptions(_Model):
    """omnitalk's own options, sent as `"omnitalk": {...}` (the openai SDK: `extra_body={"omnitalk": {...}}`)."""

    use_audio_in_video: bool = False
    input_audio_sample_rate: int = Field(24_000, ge=MIN_PCM16_RATE, le=MAX_PCM16_RATE)  # of pcm16 input audio


class ChatCompletionRequest(_Model):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None  # any name is accepted: the server serves one model
    modalities: list[Literal["text", "audio"]] = ["text"]
    audio: AudioOutput | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    omnitalk: OmnitalkOptions = Field(default_factory=OmnitalkOptions)
    n: int | None = 1
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Accepted only at their default values.
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        refuse = _unsupported(self)
        if refuse:
            param, message = refuse
            raise APIError(message, param=param, code="unsupported_parameter")
        _check_tools(self)
        if "audio" in self.modalities and self.audio is None:
            raise APIError('"audio" is required when modalities includes "audio"', param="audio")
        if self.stop is not None and "" in ([self.stop] if isinstance(self.stop, str) else self.stop):
            raise APIError("stop: an empty string can never be matched; leave it out", param="stop")
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")
        if self.stream and self.wants_audio and self.audio.format != "pcm16":
            raise APIError(
                f"Unsupported value: 'audio.format' does not support '{self.audio.format}' when stream=true. "
                "Supported values are: 'pcm16'.",
                param="audio.format",
                code="unsupported_value",
            )
        return self

    @property
    def wants_audio(self) -> bool:
        return "audio" in self.modalities

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def tool_set(self) -> Tools:
        functions = tuple(Function(f.name, f.description, f.parameters) for f in (t.function for t in self.tools or ()))
        choice = self.tool_choice or "auto"
        named = isinstance(choice, NamedToolChoice)
        mode = ToolChoice("function", choice.function.name) if named else ToolChoice(choice)
        return Tools(functions, mode, self.parallel_tool_calls is not False)


def _check_tools(r: ChatCompletionRequest) -> None:
    if r.tool_choice is not None and not r.tools:
        raise APIError(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            param="tool_choice",
        )
    names = [t.function.name for t in r.tools or ()]
    if len(set(names)) < len(names):
        raise APIError("tools: function names must be unique", param="tools")
    if isinstance(r.tool_choice, NamedToolChoice) and r.tool_choice.function.name not in names:
        raise APIError(
            f"Invalid value for 'tool_choice': no function named {r.tool_choice.function.name!r} "
            "was specified in the 'tools' parameter.",
            param="tool_choice",
        )


def _unsupported(r: ChatCompletionRequest) -> tuple[str, str] | None:
    """The first option set to a value omnitalk cannot honour, as (param, message)."""
    checks = [
        ("n", r.n not in (None, 1), "n > 1 is not supported: one choice per request"),
        ("functions", bool(r.functions), "functions is deprecated and not supported: use tools"),
        ("function_call", r.function_call not in (None, "none"), "function_call is not supported: use tool_choice"),
        ("logprobs", bool(r.logprobs) or r.top_logprobs is not None, "logprobs are not supported"),
        (
            "response_format",
            r.response_format is not None and r.response_format.get("type") != "text",
            'response_format must be {"type": "text"}: structured outputs are not supported',
        ),
        ("frequency_penalty", bool(r.frequency_penalty), "frequency_penalty is not supported; use repetition_penalty"),
        ("presence_penalty", bool(r.presence_penalty), "presence_penalty is not supported; use repetition_penalty"),
        ("logit_bias", bool(r.logit_bias), "logit_bias is not supported"),
    ]
    for param, refused, message in checks:
        if refused:
            return param, message
    return None


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request in `body`, or an APIError saying in one line what is wrong with it."""
    try:
        data = load_json(body)
    except JSONError as error:
        raise APIError(str(error), code="invalid_json") from error
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error, data) from error


def _validation_error(error: ValidationError, data: object) -> APIError:
    # The deepest error is the most specific: `str | list[...]` content also reports "not a valid string".
    worst = max(error.errors(include_url=False), key=lambda e: len(e["loc"]))
    where = _client_path(data, worst["loc"])
    return APIError(f"{where}: {worst['msg']}" if where else worst["msg"], param=where or None)


def _client_path(data: object, loc: tuple) -> str:
    """`loc` as the client wrote it (messages[0].content[1].input_audio.format), without the names pydantic
    adds for union members and discriminator tags: only steps that exist in the data are kept (and the last)."""
    path, node = "", data
    for i, step in enumerate(loc):
        if isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            path, node = f"{path}[{step}]", node[step]
        elif (isinstance(node, dict) and step in node) or i == len(loc) - 1:
            path, node = f"{path}.{step}" if path else str(step), node.get(step) if isinstance(node, dict) else None
    return path


# Responses (plain dicts built by these helpers keep the exact OpenAI shape, nulls included).
def usage(prompt: dict[str, int], text_tokens: int, audio_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    prompt_tokens = prompt["total"]
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": text_tokens + audio_tokens,
        "total_tokens": prompt_tokens + text_tokens + audio_tokens,
        "prompt_tokens_details": {
            "audio_tokens": prompt["audio"],
            "cached_tokens": cached_tokens,  # speaking requests are salted alone: always 0 for them
            "image_tokens": prompt["image"],
            "text_tokens": prompt["text"],
        },
        "completion_tokens_details": {
            "audio_tokens": audio_tokens,
            "text_tokens": text_tokens,
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
