"""JSON read within bounds: nesting depth, and text that is valid Unicode (no lone surrogates from `\\ud800`)."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 64  # deeper than any request of either protocol; keeps pydantic and json far from recursion limits
_SURROGATE = re.compile("[\ud800-\udfff]")
_STRUCTURE = re.compile(rb'[\\"\[\]{}]')


class JSONError(ValueError):
    """JSON that is malformed or out of bounds; the message says where."""


def load_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The parsed value; JSONError for malformed JSON, nesting deeper than `max_depth` or lone surrogates."""
    if _too_deep(text, max_depth):  # checked on the raw text first: json.loads itself recurses
        raise JSONError(f"the JSON nests deeper than {max_depth} levels")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise JSONError(f"We could not parse the JSON body of your request: {error}") from error
    where = _lone_surrogate(value)
    if where is not None:
        raise JSONError(f"{where or 'the body'}: the text holds a lone UTF-16 surrogate, which is not valid Unicode")
    return value


def _too_deep(text: str | bytes, max_depth: int) -> bool:
    """Whether brackets outside strings nest deeper than `max_depth` (malformed text is left to the parser)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    depth, in_string, escaped_at = 0, False, -2
    for match in _STRUCTURE.finditer(raw):  # only the bytes that matter: base64 media has none of them
        byte, at = match.group(), match.start()
        if in_string:
            if byte == b"\\":
                escaped_at = at if escaped_at != at - 1 else -2  # a backslash escapes the next byte only
            elif byte == b'"' and escaped_at != at - 1:
                in_string = False
        elif byte == b'"':
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _lone_surrogate(value: Any) -> str | None:
    """The path (messages[0].content) of the first string holding a lone surrogate, or None."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return path
        elif isinstance(node, dict):
            for key, item in node.items():
                if _SURROGATE.search(key):
                    return path
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(node))
    return None
