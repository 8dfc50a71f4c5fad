"""The one writer of a connection: a bounded queue of events and the task that sends them, in order.

Producers (the receive loop, the live response) never wait: a client that lets the queue fill up is disconnected
instead of stalling the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.websockets import WebSocket

from omnitalk.server.metrics import Metrics

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, ws: WebSocket, size: int, metrics: Metrics) -> None:
        self.ws, self.metrics = ws, metrics
        self.queue: asyncio.Queue[tuple[str | None, str]] = asyncio.Queue(size)
        self.dropped: set[str] = set()  # responses whose queued deltas are no longer wanted
        self.overflowed = False
        self.task: asyncio.Task | None = None

    def start(self) -> asyncio.Task:
        self.task = asyncio.create_task(self._run())
        return self.task

    def send(self, event: dict[str, Any], response_id: str | None = None) -> None:
        """Queues one event; `response_id` tags a delta that `drop` may discard before it goes out."""
        if self.overflowed:
            return
        try:
            self.queue.put_nowait((response_id, json.dumps(event)))
        except asyncio.QueueFull:
            self.overflowed = True
            log.warning("realtime: a client let %d events pile up unread; disconnecting it", self.queue.maxsize)
            if self.task is not None:
                self.task.cancel()
            return
        self.metrics.queue_depth.inc()

    def drop(self, response_id: str) -> None:
        self.dropped.add(response_id)

    async def _run(self) -> None:
        try:
            while True:
                response_id, text = await self.queue.get()
                self.metrics.queue_depth.dec()
                if response_id is None or response_id not in self.dropped:
                    await self.ws.send_text(text)
        finally:
            self.metrics.queue_depth.dec(self.queue.qsize())
            while not self.queue.empty():
                self.queue.get_nowait()
