"""Tool calls parsed from the thinker's text as it streams: `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
blocks (Qwen2.5's format), or, when a call is forced, the whole answer as one such JSON object. A call opens as
soon as its name is written and its arguments stream as the thinker writes them."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Literal

from omnitalk.server.tools import CALL_END, CALL_START, Tools

# A call whose name comes first and whose arguments are an object can stream; any other closes whole.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


@dataclass(frozen=True, slots=True)
class ToolCall:
    index: int  # among this answer's calls
    id: str
    name: str
    arguments: str  # a JSON text


@dataclass(frozen=True, slots=True)
class CallEvent:
    """`open`: the call's id and name (arguments ""); `arguments`: their next piece; `close`: the call, its
    arguments whole (the pieces joined)."""

    kind: Literal["open", "arguments", "close"]
    call: ToolCall


@dataclass(slots=True)
class _Open:
    """A call that has opened: where its arguments start in the block, how far they have been scanned and sent."""

    call: ToolCall
    start: int
    sent: str = ""
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    whole: bool = False  # the arguments' object has closed

    def advance(self, body: str) -> str:
        """The arguments' characters in `body` not sent yet, up to the end of their object."""
        at = self.start + len(self.sent)
        end = at
        while end < len(body) and not self.whole:
            c = body[end]
            end += 1
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (c == "\\", c != '"')
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                self.whole = self.depth == 0
        piece = body[at:end]
        self.sent += piece
        return piece


@dataclass(slots=True)
class CallParser:
    """`feed(text)` returns the text to show (and speak) and the call events so far; `finish()` the rest. Text
    that may be the start of a tag is held back until it is known not to be. A block that does not hold a call for
    an offered function is shown as the text it is, unless it opened as one."""

    tools: Tools
    calls: list[ToolCall] = field(default_factory=list)  # the closed ones
    _buffer: str = ""
    _in_call: bool = False
    _open: _Open | None = None

    @property
    def calling(self) -> bool:
        """A call has opened."""
        return bool(self.calls) or self._open is not None

    def feed(self, text: str) -> tuple[str, list[CallEvent]]:
        if not self.tools.active:
            return text, []
        self._buffer += text
        events: list[CallEvent] = []
        if self.tools.forced:
            self._stream(self._buffer, events)
            return "", events
        shown: list[str] = []
        while True:
            tag = CALL_END if self._in_call else CALL_START
            at = self._buffer.find(tag)
            if at < 0:
                break
            body, self._buffer = self._buffer[:at], self._buffer[at + len(tag) :]
            if self._in_call:
                self._block(body, shown, events)
            else:
                shown.append(body)
            self._in_call = not self._in_call
        if self._in_call:
            self._stream(self._buffer, events)
        else:
            keep = _partial_tag(self._buffer, CALL_START)
            shown.append(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
        return "".join(shown), events

    def finish(self) -> tuple[str, list[CallEvent]]:
        """What is left once the thinker is done: an unclosed block still counts if it holds a whole call."""
        rest, self._buffer = self._buffer, ""
        if not self.tools.active:
            return rest, []
        shown: list[str] = []
        events: list[CallEvent] = []
        if self.tools.forced or self._in_call:
            self._block(rest, shown, events, forced=self.tools.forced)
        else:
            shown.append(rest)
        return "".join(shown), events

    def _stream(self, body: str, events: list[CallEvent]) -> None:
        """Opens the block's call once its name is known, then sends its arguments as they come."""
        if self._open is None:
            head = _HEAD.match(body)
            name = _name(head.group(1)) if head else None
            if name is None or not self._allowed(name):
                return
            call = ToolCall(len(self.calls), _new_id(), name, "")
            self._open = _Open(call, head.end())
            events.append(CallEvent("open", call))
        if piece := self._open.advance(body):
            events.append(CallEvent("arguments", replace(self._open.call, arguments=piece)))

    def _block(self, body: str, shown: list[str], events: list[CallEvent], forced: bool = False) -> None:
        self._stream(body, events)
        if self._open is not None:  # it opened: it stands, with the arguments as they were written
            call, self._open = replace(self._open.call, arguments=self._open.sent), None
        else:
            call = self._call(body)
            if call is None or not self._allowed(call.name):
                if call is None:
                    shown.append(body if forced else f"{CALL_START}{body}{CALL_END}")
                return
            events += [CallEvent("open", replace(call, arguments="")), CallEvent("arguments", call)]
        self.calls.append(call)
        events.append(CallEvent("close", call))

    def _allowed(self, name: str) -> bool:
        """An offered function, and the first call unless calls may be parallel (later ones are dropped)."""
        return name in {f.name for f in self.tools.functions} and (self.tools.parallel or not self.calls)

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
        return ToolCall(len(self.calls), _new_id(), data["name"], json.dumps(arguments, ensure_ascii=False))


def _name(written: str) -> str | None:
    try:
        return json.loads(f'"{written}"')
    except ValueError:
        return None


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
