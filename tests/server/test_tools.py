"""Function calling without the engine: tools rendered as Qwen2.5's chat template does, calls parsed as they stream,
the schema that forces a call, and the answer budget the context leaves."""

from __future__ import annotations

import json

import jsonschema
import pytest

from omnitalk.engine.request import Message, Text
from omnitalk.server.context import BudgetError, answer_budget
from omnitalk.server.tool_calls import CallEvent, CallParser, ToolCall
from omnitalk.server.tools import Function, ToolChoice, Tools, assistant_text, response_text, with_tools

WEATHER = Function(
    "get_weather",
    "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = Function("get_time")
AUTO = Tools((WEATHER, TIME))


def test_tools_go_into_the_system_turn_as_qwen25s_template_renders_them():
    messages = with_tools((Message("system", (Text("Be brief."),)), Message("user", (Text("Hi"),))), AUTO)
    weather = (
        '{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
    )
    time = '{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}'
    expected = (
        "Be brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{weather}\n{time}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>"
    )
    assert messages[0] == Message("system", (Text(expected),))
    assert messages[1:] == (Message("user", (Text("Hi"),)),)


def test_a_conversation_without_system_turn_gets_the_templates_default_and_none_gets_no_tools():
    user = (Message("user", (Text("Hi"),)),)
    assert with_tools(user, AUTO)[0].content[0].text.startswith("You are a helpful assistant.\n\n# Tools\n")
    assert with_tools(user, Tools((WEATHER,), ToolChoice("none"))) == user


def test_earlier_calls_and_their_results_are_written_as_the_template_writes_them():
    text = assistant_text("Let me look.", [("get_weather", '{"city":"Paris"}'), ("get_time", "{}")])
    assert text == (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    assert response_text(["20 C", "noon"]) == (
        "<tool_response>\n20 C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    )


def feed_events(parser: CallParser, pieces: list[str]) -> tuple[str, list[CallEvent]]:
    shown, events = [], []
    for piece in pieces:
        text, found = parser.feed(piece)
        shown.append(text)
        events += found
    text, found = parser.finish()
    return "".join(shown) + text, events + found


def feed_all(parser: CallParser, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    """The text shown and the calls closed; every call's events are whole and in order."""
    shown, events = feed_events(parser, pieces)
    calls = []
    for call in [e.call for e in events if e.kind == "close"]:
        mine = [e for e in events if e.call.id == call.id]
        assert mine[0].kind == "open" and mine[-1].kind == "close"
        assert all(e.kind == "arguments" for e in mine[1:-1])
        assert "".join(e.call.arguments for e in mine[1:-1]) == call.arguments
        calls.append(call)
    return shown, calls


def test_arguments_stream_as_they_are_written():
    answer = 'Hi<tool_call>\n{"name": "get_weather", "arguments": {"city": "R\\"o}m"}}\n</tool_call>'
    parser = CallParser(AUTO)
    seen = [parser.feed(answer[i : i + 4]) for i in range(0, len(answer), 4)]
    events = [e for _, found in seen for e in found]
    assert [e.kind for e in events][:2] == ["open", "arguments"] and events[-1].kind == "close"
    assert events[0].call.name == "get_weather" and events[0].call.arguments == ""
    pieces = [e.call.arguments for e in events if e.kind == "arguments"]
    assert len(pieces) > 3 and "".join(pieces) == '{"city": "R\\"o}m"}' == events[-1].call.arguments
    assert "".join(text for text, _ in seen) == "Hi" and parser.finish() == ("", [])


def test_calls_are_parsed_as_they_stream_and_their_text_is_never_shown():
    answer = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n<tool_call>'
    answer += '{"name": "get_time", "arguments": {}}</tool_call>'
    pieces = [answer[i : i + 3] for i in range(0, len(answer), 3)]  # tags cut anywhere
    shown, calls = feed_all(CallParser(AUTO), pieces)
    assert shown.strip() == "Sure."
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Rome"}),
        (1, "get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_text_that_only_looks_like_a_tag_or_a_bad_call_is_shown():
    shown, calls = feed_all(CallParser(AUTO), ["a <tool", "_c", "b<tool_call>{not json}</tool_call>c"])
    assert calls == [] and shown == "a <tool_cb<tool_call>{not json}</tool_call>c"
    shown, calls = feed_all(CallParser(AUTO), ['<tool_call>{"name": "unknown", "arguments": {}}</tool_call>'])
    assert calls == [] and "unknown" in shown


def test_an_unclosed_call_counts_if_whole_and_parallel_false_keeps_the_first():
    one = Tools((WEATHER, TIME), parallel=False)
    pieces = ['<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>', '{"name": "get_time"}']
    shown, calls = feed_all(CallParser(one), pieces)
    assert shown == "" and [c.name for c in calls] == ["get_time"]
    shown, calls = feed_all(CallParser(AUTO), pieces)
    assert [c.name for c in calls] == ["get_time", "get_time"]


def test_with_tool_choice_none_everything_is_text():
    none = Tools((WEATHER,), ToolChoice("none"))
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert feed_all(CallParser(none), [text]) == (text, [])


@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("function", "get_weather")])
def test_a_forced_answer_is_one_call_matching_the_schema(choice):
    tools = Tools((WEATHER, TIME), choice)
    schema = json.loads(tools.json_schema())
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {}}, schema)
    if choice.mode == "function":
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "get_time", "arguments": {}}, schema)
    else:
        jsonschema.validate({"name": "get_time", "arguments": {}}, schema)
    shown, calls = feed_all(CallParser(tools), ['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'])
    assert shown == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Oslo"}')]
    assert tools.system_text("S").count('"name": "get_time"') == (choice.mode == "required")
    assert AUTO.json_schema() is None


def test_the_answer_budget_is_what_the_context_leaves():
    assert answer_budget(None, 1024, 100, 8192) == 1024
    assert answer_budget(None, 1024, 8000, 8192) == 192
    assert answer_budget(92, 1024, 8100, 8192) == 92
    with pytest.raises(BudgetError, match=r"maximum context length is 8192 tokens.*8193 tokens"):
        answer_budget(93, 1024, 8100, 8192)


def test_realtime_calls_join_their_answer_and_outputs_join_each_other():
    from omnitalk.server.realtime.session import Item, ItemPart, conversation_messages

    def call(n: int) -> Item:
        return Item(f"c{n}", "assistant", [], type="function_call", call_id=f"k{n}", name="get_time", arguments="{}")

    def output(n: int) -> Item:
        return Item(f"o{n}", "user", [], type="function_call_output", call_id=f"k{n}", output=f"t{n}")

    items = (
        Item("u", "user", [ItemPart("input_text", "What time?")]),
        Item("a", "assistant", [ItemPart("output_audio", "Checking.")]),
        call(1),
        call(2),
        output(1),
        output(2),
    )
    messages = conversation_messages(items)
    calls = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert messages == [
        Message("user", (Text("What time?"),)),
        Message("assistant", (Text(f"Checking.\n{calls}\n{calls}"),)),
        Message("user", (Text(response_text(["t1", "t2"])),)),
    ]


def test_truncation_keeps_the_newest_items_that_fit():
    from omnitalk.server.context import first_kept

    def size(start: int) -> int:  # 10 tokens of instructions, then 10 items of 5 tokens
        return 10 + 5 * (10 - start)

    assert first_kept(10, size, 60, 1.0) == 0  # everything fits: nothing is dropped
    assert first_kept(10, size, 59, 1.0) == 1  # the oldest item goes
    assert first_kept(10, size, 30, 1.0) == 6  # 4 items fill the 20 tokens left by the instructions
    assert first_kept(10, size, 30, 0.5) == 8  # retention 0.5: only 10 of them
    assert first_kept(10, size, 5, 1.0) == 10  # not even the instructions fit: every item goes


def test_chat_requests_name_their_tool_mistakes_as_openai_does():
    from omnitalk.server.chat.protocol import parse_request
    from omnitalk.server.errors import APIError

    def parse(**body) -> object:
        return parse_request(json.dumps({"messages": [{"role": "user", "content": "hi"}], **body}).encode())

    tool = {"type": "function", "function": {"name": "get_time"}}
    with pytest.raises(APIError, match="only allowed when 'tools' are specified") as caught:
        parse(tool_choice="auto")
    assert caught.value.param == "tool_choice"
    with pytest.raises(APIError, match="no function named 'other'"):
        parse(tools=[tool], tool_choice={"type": "function", "function": {"name": "other"}})
    with pytest.raises(APIError, match="unique"):
        parse(tools=[tool, tool])
    request = parse(tools=[tool], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert request.tool_set == Tools((TIME,), ToolChoice("function", "get_time"))
    assert parse(tools=[tool], parallel_tool_calls=False).tool_set == Tools((TIME,), parallel=False)
    assert not parse().tool_set.active
