"""Function calling on /v1/realtime through the openai SDK's Realtime client, on the tiny model (calls forced with
tool_choice, so the constrained thinker writes valid arguments), and the context-window check on max_output_tokens."""

from __future__ import annotations

import json

import jsonschema
from realtime_client import MANUAL, of, realtime

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}  # no arguments
ASK = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Rome?"}]}


async def test_a_forced_call_round_trip(server):
    url, _ = server
    async with realtime(url) as (conn, events):
        named = {"type": "function", "name": "get_weather"}
        await conn.session.update(session={**MANUAL, "tools": [WEATHER, TIME], "tool_choice": named})
        session = (await events.until("session.updated"))[-1]["session"]
        assert session["tools"] == [WEATHER, TIME] and session["tool_choice"] == named
        await conn.conversation.item.create(item=ASK)
        await events.until("conversation.item.done")
        await conn.response.create(response={"max_output_tokens": 200})
        turn = await events.until("response.done")
        deltas = of(turn, "response.function_call_arguments.delta")
        assert len(deltas) > 1  # the arguments stream as the thinker writes them
        kinds = [e["type"] for e in turn if e not in deltas[1:]]
        assert kinds == [
            "response.created",
            "response.output_item.added",
            "conversation.item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]  # the call added before its arguments, whole when done; nothing spoken
        added, done = turn[1]["item"], of(turn, "response.output_item.done")[0]["item"]
        assert added["type"] == "function_call" and added["name"] == "get_weather" and added["arguments"] == ""
        [finished] = of(turn, "response.function_call_arguments.done")
        arguments = finished["arguments"]
        jsonschema.validate(json.loads(arguments), WEATHER["parameters"])
        assert "".join(d["delta"] for d in deltas) == arguments and finished["name"] == "get_weather"
        assert {d["call_id"] for d in deltas} == {finished["call_id"]} == {added["call_id"]}
        assert finished["call_id"] == done["call_id"] and added["call_id"].startswith("call_")
        assert done["arguments"] == arguments and done["status"] == "completed"
        response = turn[-1]["response"]
        assert response["status"] == "completed" and response["output"] == [done]

        output = {"type": "function_call_output", "call_id": done["call_id"], "output": '{"sky": "clear"}'}
        await conn.conversation.item.create(item=output)
        created = await events.until("conversation.item.done")
        assert [e["type"] for e in created] == ["conversation.item.added", "conversation.item.done"]
        assert created[0]["previous_item_id"] == done["id"] and created[1]["item"]["output"] == '{"sky": "clear"}'
        await conn.response.create(response={"tool_choice": "none", "max_output_tokens": 6})
        answer = await events.until("response.done")
        assert answer[-1]["response"]["status"] in ("completed", "incomplete")
        assert of(answer, "response.output_item.added")[0]["item"]["type"] == "message"
        assert of(answer, "response.output_audio.delta")  # spoken, as the session's modalities ask
        await conn.conversation.item.retrieve(item_id=done["id"])
        retrieved = (await events.until("conversation.item.retrieved"))[-1]["item"]
        assert retrieved == done


async def test_response_tools_override_the_sessions_and_bad_choices_are_errors(server):
    url, _ = server
    async with realtime(url) as (conn, events):
        await conn.session.update(session={**MANUAL, "output_modalities": ["text"]})
        await events.until("session.updated")
        await conn.session.update(session={"type": "realtime", "tool_choice": {"type": "function", "name": "nope"}})
        error = await events.error()
        assert error["param"] == "session.tool_choice" and "'nope'" in error["message"]
        await conn.conversation.item.create(item={"type": "function_call_output", "output": "x"})
        error = await events.error()
        assert error["code"] == "missing_required_parameter" and error["param"] == "item.call_id"
        await conn.response.create(response={"input": [ASK], "tools": [TIME], "tool_choice": "required"})
        turn = await events.until("response.done")
        [call] = turn[-1]["response"]["output"]
        assert call["type"] == "function_call" and call["name"] == "get_time" and json.loads(call["arguments"]) == {}
        assert of(turn, "conversation.item.added")[0]["item"]["id"] == call["id"]  # own input; the answer still joins
        assert of(turn, "response.function_call_arguments.done")[0]["call_id"] == call["call_id"]


async def test_max_output_tokens_beyond_the_context_is_an_error_and_the_session_goes_on(server):
    url, state = server
    context = state.engine.thinker.max_model_len
    async with realtime(url) as (conn, events):
        await conn.session.update(session={**MANUAL, "output_modalities": ["text"]})
        await events.until("session.updated")
        await conn.conversation.item.create(item=ASK)
        await events.until("conversation.item.done")
        await conn.response.create(response={"max_output_tokens": context})
        error = await events.error()
        assert error["code"] == "context_length_exceeded" and error["param"] == "response.max_output_tokens"
        assert f"maximum context length is {context} tokens" in error["message"]
        await conn.response.create(response={"max_output_tokens": 3})
        assert (await events.until("response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
