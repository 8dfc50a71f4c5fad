"""Tool calls parsed from the thinker's text as it streams: `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
blocks (Qwen2.5's format), or, when a call is forced, the whole answer as one such JSON object."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from omnitalk.server.tools import CALL_END, CALL_START, Tools


@dataclass(frozen=True, slots=True)
class ToolCall:
    index: int  # among this answer's calls
    id: str
    name: str
    arguments: str  # a JSON text


@dataclass(slots=True)
class CallParser:
    """`feed(text)` returns the text to show (and speak) and the calls completed so far; `finish()` the rest.
    Text that may be the start of a tag is held back until it is known not to be. A block that does not hold a
    call for an offered function is shown as the text it is."""

    tools: Tools
    calls: list[ToolCall] = field(default_factory=list)
    _buffer: str = ""
    _in_call: bool = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if not self.tools.active:
            return text, []
        self._buffer += text
        if self.tools.forced:
            return "", []
        shown: list[str] = []
        found: list[ToolCall] = []
        while True:
            tag = CALL_END if self._in_call else CALL_START
            at = self._buffer.find(tag)
            if at < 0:
                break
            body, self._buffer = self._buffer[:at], self._buffer[at + len(tag) :]
            if self._in_call:
                self._block(body, shown, found)
            else:
                shown.append(body)
            self._in_call = not self._in_call
        if not self._in_call:
            keep = _partial_tag(self._buffer, CALL_START)
            shown.append(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
        return "".join(shown), found

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left once the thinker is done: an unclosed block still counts if it holds a whole call."""
        rest, self._buffer = self._buffer, ""
        if not self.tools.active:
            return rest, []
        shown: list[str] = []
        found: list[ToolCall] = []
        if self.tools.forced or self._in_call:
            self._block(rest, shown, found, forced=self.tools.forced)
        else:
            shown.append(rest)
        return "".join(shown), found

    def _block(self, body: str, shown: list[str], found: list[ToolCall], forced: bool = False) -> None:
        call = self._call(body)
        if call is None:
            shown.append(body if forced else f"{CALL_START}{body}{CALL_END}")
            return
        if self.calls and not self.tools.parallel:
            return  # one call only: later ones are dropped
        self.calls.append(call)
        found.append(call)

    def _call(self, body: str) -> ToolCall | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        if data["name"] not in {f.name for f in self.tools.functions}:
            return None
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        text = json.dumps(arguments, ensure_ascii=False)
        return ToolCall(len(self.calls), f"call_{uuid.uuid4().hex[:24]}", data["name"], text)


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
