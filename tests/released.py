"""What a test checks once a thinker request was dropped or left: nothing of it is left anywhere."""

from __future__ import annotations

import asyncio

from omnitalk.engine.thinker.engine import ThinkerEngine

TIMEOUT = 120.0


async def assert_released(engine: ThinkerEngine) -> None:
    """No stream, no tapped stream, no request in the frontend, and every KV block free in the EngineCore (the
    block pool refuses a prefix-cache reset while any block is held)."""
    for _ in range(100):  # the EngineCore frees an aborted request on its next step
        idle = not engine.llm.output_processor.has_unfinished_requests()
        if idle and await asyncio.wait_for(engine.llm.reset_prefix_cache(), TIMEOUT):
            break
        await asyncio.sleep(0.1)
    assert engine.num_open_streams == 0 and not engine._tapped
    assert not engine.llm.output_processor.has_unfinished_requests()
    assert await asyncio.wait_for(engine.llm.reset_prefix_cache(), TIMEOUT)
