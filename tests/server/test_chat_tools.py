"""Function calling on /v1/chat/completions, through the openai SDK against the real server on the tiny model.

The random model never calls a tool of its own accord, so the calls here are forced (`required` or a named
function): the thinker is then constrained to valid JSON for the function's schema, which is what these check."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import jsonschema
import openai
import pytest_asyncio

from omnitalk.server.chat.messages import TranscriptCache, convert
from omnitalk.server.chat.protocol import parse_request

MODEL = "omnitalk-tiny-random"
HELLO = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "celsius": {"type": "boolean"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "W", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
GET_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest_asyncio.fixture(loop_scope="session")
async def sdk(server) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0) as client:
        yield client


async def test_a_named_function_is_called_with_arguments_matching_its_schema(sdk):
    answer = await sdk.chat.completions.create(
        model=MODEL, messages=HELLO, tools=TOOLS, tool_choice=GET_WEATHER, max_tokens=200
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's, for a function named by tool_choice
    assert choice.message.content is None and choice.message.role == "assistant"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    assert answer.usage.completion_tokens > 0


async def test_required_streams_one_call_in_openais_delta_shape(sdk):
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=HELLO, tools=TOOLS, tool_choice="required", max_tokens=200, stream=True
    )
    chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert {c.index for c in calls} == {0}
    head, *pieces = calls
    assert head.id.startswith("call_") and head.type == "function" and head.function.arguments == ""
    assert len(pieces) > 1  # the arguments stream as the thinker writes them
    assert all(p.id is None and p.type is None and p.function.name is None for p in pieces)
    assert not any(d.content for d in deltas)
    arguments = "".join(p.function.arguments for p in pieces)
    jsonschema.validate(json.loads(arguments), SCHEMAS[head.function.name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_the_sdks_stream_helper_assembles_the_streamed_arguments(sdk):
    async with sdk.chat.completions.stream(
        model=MODEL, messages=HELLO, tools=TOOLS, tool_choice="required", max_tokens=200
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_completion()
    pieces = [e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta"]
    [done] = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    [call] = final.choices[0].message.tool_calls
    assert len(pieces) > 1 and "".join(pieces) == done.arguments == call.function.arguments
    assert done.name == call.function.name and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def test_a_forced_call_with_audio_asked_speaks_nothing(sdk):
    answer = await sdk.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
    )
    message = answer.choices[0].message
    assert message.audio is None and message.content is None and len(message.tool_calls) == 1
    assert answer.usage.completion_tokens_details.audio_tokens == 0


def round_trip(arguments: str) -> list[dict]:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "no rain"}]},
    ]


async def test_a_call_and_its_results_in_the_history_are_answered(sdk):
    messages = round_trip('{"city": "Paris", "celsius": true}')
    answer = await sdk.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > 0


async def test_the_history_reaches_the_thinker_as_qwen25s_template_writes_it(thinker):
    body = {"messages": round_trip('{"city":"Paris","celsius":true}'), "tools": TOOLS, "tool_choice": "none"}
    conversation = convert(parse_request(json.dumps(body).encode()), TranscriptCache(), thinker.tokenizer, 60)
    roles = [m.role for m in conversation.messages]
    assert roles == ["user", "assistant", "user"]  # tool_choice none: no tools section, no system turn added
    assert conversation.messages[1].content[0].text == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "celsius": true}}\n</tool_call>'
    )
    assert conversation.messages[2].content[0].text == (
        "<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\nno rain\n</tool_response>"
    )
    body["tool_choice"] = "auto"
    conversation = convert(parse_request(json.dumps(body).encode()), TranscriptCache(), thinker.tokenizer, 60)
    assert conversation.messages[0].role == "system" and "<tools>\n" in conversation.messages[0].content[0].text
