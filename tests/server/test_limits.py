"""JSON bounds and the error table, without an engine."""

from __future__ import annotations

import json

import pytest

from omnitalk.engine.failure import EngineFailure
from omnitalk.engine.media import MediaError
from omnitalk.engine.thinker.engine import ThinkerInputError
from omnitalk.engine.thinker.prompt import PromptError
from omnitalk.server.errors import to_api_error
from omnitalk.server.limits import MAX_JSON_DEPTH, JSONError, load_json
from omnitalk.server.state import Busy


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_up_to_the_bound_is_read_and_beyond_it_refused():
    assert load_json(nested(MAX_JSON_DEPTH)) is not None
    with pytest.raises(JSONError, match="deeper than 64"):
        load_json(nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(JSONError, match="deeper than 64"):
        load_json(nested(100_000))  # far past Python's recursion limit: no RecursionError


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"text": "[" * 500}),  # brackets inside strings do not count
        json.dumps({"text": '\\"' + "{" * 500}),  # nor after escaped quotes and backslashes
        json.dumps({"a": "\\\\", "b": "[" * 500}),
    ],
)
def test_brackets_in_strings_are_not_nesting(text):
    assert load_json(text) == json.loads(text)


def test_lone_surrogates_are_refused_with_their_path_and_pairs_are_kept():
    with pytest.raises(JSONError, match=r"messages\[0\]\.content: the text holds a lone"):
        load_json('{"messages": [{"content": "a \\ud800 b"}]}')
    assert load_json('{"t": "\\ud83d\\ude00"}') == {"t": "\U0001f600"}


def test_malformed_json_is_a_json_error():
    with pytest.raises(JSONError, match="could not parse"):
        load_json(b'{"messages": [')


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (MediaError("bad audio"), 400, "invalid_request_error"),
        (ThinkerInputError("too long"), 400, "invalid_request_error"),
        (PromptError("use_audio_in_video needs videos"), 400, "invalid_request_error"),
        (Busy("full"), 429, "rate_limit_error"),
        (ValueError("shapes [3, 7] and [4, 7]"), 500, "server_error"),  # inside the engine: not the client's fault
        (KeyError("slot"), 500, "server_error"),
        (EngineFailure("the speech stage failed"), 500, "server_error"),
    ],
)
def test_the_error_table(error, status, kind):
    api = to_api_error(error)
    assert (api.status, api.type) == (status, kind)
    if status == 500 and not isinstance(error, EngineFailure):
        assert "shapes" not in api.message and "reference error_" in api.message
