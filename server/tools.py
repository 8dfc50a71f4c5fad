"""Function calling for both protocols: tools in the prompt as Qwen2.5's chat template puts them, and what
constrains the thinker when a call is required. Parsing the calls out of the stream is in tool_calls.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from omnitalk.engine.request import Message, Text

# Qwen2.5's chat template: the tools go into the system turn; calls and their results are tagged.
_TOOLS_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
NO_PARAMETERS = {"type": "object", "properties": {}}
DEFAULT_SYSTEM = "You are a helpful assistant."  # what the Omni template says when a conversation has no system turn


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: the function takes no arguments

    def to_json(self) -> dict[str, Any]:
        """As the chat template's `tool | tojson` writes it: OpenAI's tool object."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters if self.parameters is not None else NO_PARAMETERS
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None  # mode "function": the one function to call


@dataclass(frozen=True, slots=True)
class Tools:
    """The functions a response may call and how it must choose among them."""

    functions: tuple[Function, ...] = ()
    choice: ToolChoice = ToolChoice()
    parallel: bool = True  # several calls in one answer (mode "auto"; "required" and a named function make one)

    @property
    def active(self) -> bool:
        return bool(self.functions) and self.choice.mode != "none"

    @property
    def forced(self) -> bool:
        """The whole answer is one call, constrained to valid JSON: nothing of it is text or speech."""
        return self.active and self.choice.mode in ("required", "function")

    def system_text(self, system: str) -> str:
        """The system turn's text with the tools section appended (the conversation's own system text first)."""
        if not self.active:
            return system
        lines = "".join("\n" + json.dumps(f.to_json(), ensure_ascii=False) for f in self._offered())
        return f"{system}{_TOOLS_HEAD}{lines}{_TOOLS_TAIL}"

    def json_schema(self) -> str | None:
        """The schema a forced answer must match: {"name": ..., "arguments": {...}} for one of the offered functions."""
        if not self.forced:
            return None
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": _closed(f.parameters or NO_PARAMETERS)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in self._offered()
        ]
        return json.dumps(options[0] if len(options) == 1 else {"anyOf": options})

    def _offered(self) -> tuple[Function, ...]:
        if self.choice.mode == "function":
            return tuple(f for f in self.functions if f.name == self.choice.name)
        return self.functions


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The arguments' schema without properties it does not name, unless it says otherwise (as OpenAI's strict
    mode): a forced call writes the arguments the function takes, and a weak model would pad with others."""
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def call_text(name: str, arguments: str) -> str:
    """An earlier call as the assistant turn carries it (the template's form; arguments are a JSON text)."""
    try:
        args = json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        args = json.dumps(arguments, ensure_ascii=False)  # not JSON: kept as the string it is
    return f'{CALL_START}\n{{"name": "{name}", "arguments": {args}}}\n{CALL_END}'


def response_text(outputs: list[str]) -> str:
    """Consecutive tool results as the one user turn the template makes of them."""
    return "\n".join(f"<tool_response>\n{output}\n</tool_response>" for output in outputs)


def with_tools(messages: tuple[Message, ...], tools: Tools) -> tuple[Message, ...]:
    """The conversation with the tools section in its system turn (made if it has none)."""
    if not tools.active:
        return messages
    first = messages[0] if messages else None
    if first is not None and first.role == "system" and all(isinstance(part, Text) for part in first.content):
        system = "".join(part.text for part in first.content)  # type: ignore[union-attr]
        return (Message("system", (Text(tools.system_text(system)),)), *messages[1:])
    return (Message("system", (Text(tools.system_text(DEFAULT_SYSTEM)),)), *messages)


def assistant_text(content: str, calls: list[tuple[str, str]]) -> str:
    """An assistant turn's text: its words, then its calls (name, arguments) as the template writes them."""
    return "\n".join([content] * bool(content) + [call_text(name, arguments) for name, arguments in calls])


def call_tokens(tokenizer: Any) -> frozenset[int]:
    """The token that opens a call (one added token in Qwen2.5's vocabulary): where speech must stop."""
    return frozenset({tokenizer.convert_tokens_to_ids(CALL_START)})
