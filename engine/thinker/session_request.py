"""A session request's prompt as vLLM will see it, and the session's stored rows put in front of its stream.

Shared by `ThinkerEngine._submit` (a turn sent at once) and `ThinkerIngest` (an ingest session's head and its
chunks): both run their prompt through vLLM's own input processor (in a thread, as `AsyncLLM` would) so that its
token ids and media item hashes, and from them its content keys, are known before vLLM computes anything; the rows
the session holds for the covered prefix must be in the stream before the tap's first rows.
"""

from __future__ import annotations

import asyncio
from typing import Any

from omnitalk.engine.thinker.conversation import SessionRows, content_keys
from omnitalk.engine.thinker.events import HiddenStates


async def processed(llm, request_id: str, prompt: dict[str, Any], params):
    """`prompt` processed by vLLM's input processor into the EngineCoreRequest vLLM would make of it (vLLM's input
    errors are raised as they are: callers classify them)."""
    tasks = await llm.get_supported_tasks()
    return await llm.input_processor.process_inputs_async(request_id, prompt, params, supported_tasks=tasks)


def keys_of(core, keys: list[bytes] | None = None) -> list[bytes]:
    """The content keys of a processed request (`core`), continuing `keys` (a chunk of a streaming-input request)."""
    return content_keys(list(core.prompt_token_ids or ()), core.mm_features, keys)


def put_covered(stored: SessionRows | None, keys: list[bytes], queue: asyncio.Queue) -> int:
    """Puts the stored rows of the leading positions of `keys` that `stored` covers into `queue`, as one
    `HiddenStates(0, ...)`; returns how many."""
    covered = stored.covered(keys) if stored is not None else 0
    if covered:
        queue.put_nowait(HiddenStates(0, stored.rows[:covered]))
    return covered
