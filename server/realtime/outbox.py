"""The one writer of a connection: a queue of events and the task that sends them, in order.

Producers (the receive loop, the live response) never wait. The queue is bounded in bytes, and a client is dropped
(rather than stalling the engine) once it has fallen behind real time by more than a margin: the audio it has taken
lags the wall time since its response's first audio. A client that plays at real time while the engine runs ahead
lets the queue grow within the byte bound and is never dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket

from omnitalk.server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _AudioClock:
    """The audio of one response: when its first second was queued, and how many seconds the client took."""

    response_id: str
    started: float
    sent_s: float = 0.0

    def lag(self, now: float) -> float:
        return now - self.started - self.sent_s


class Outbox:
    def __init__(self, ws: WebSocket, metrics: Metrics, max_bytes: int, max_lag_s: float) -> None:
        self.ws, self.metrics, self.max_bytes, self.max_lag_s = ws, metrics, max_bytes, max_lag_s
        self.queue: asyncio.Queue[tuple[str | None, str, float]] = asyncio.Queue()
        self.queued_bytes = 0
        self.dropped: set[str] = set()  # responses whose queued deltas are no longer wanted
        self.overflowed = False
        self.task: asyncio.Task | None = None
        self._clock: _AudioClock | None = None

    def start(self) -> asyncio.Task:
        self.task = asyncio.create_task(self._run())
        return self.task

    def send(self, event: dict[str, Any], response_id: str | None = None, audio_s: float = 0.0) -> None:
        """Queues one event; `response_id` tags a delta that `drop` may discard before it goes out, `audio_s` is
        the playing time of the audio it carries."""
        if self.overflowed:
            return
        text = json.dumps(event)
        now = time.monotonic()
        if audio_s and response_id is not None and (self._clock is None or self._clock.response_id != response_id):
            self._clock = _AudioClock(response_id, now)
        if self.queued_bytes + len(text) > self.max_bytes:
            self._overflow(f"let {self.queued_bytes} bytes pile up unread")
            return
        if audio_s and self._clock is not None and self._clock.lag(now) > self.max_lag_s:
            self._overflow(f"fell {self._clock.lag(now):.1f} s behind real time")
            return
        self.queue.put_nowait((response_id, text, audio_s))
        self.queued_bytes += len(text)
        self.metrics.queue_depth.inc()
        self.metrics.queued_bytes.inc(len(text))

    def drop(self, response_id: str) -> None:
        self.dropped.add(response_id)

    def _overflow(self, why: str) -> None:
        self.overflowed = True
        self.metrics.slow_clients.inc()
        log.warning("realtime: a client %s; disconnecting it", why)
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        try:
            while True:
                response_id, text, audio_s = await self.queue.get()
                self.queued_bytes -= len(text)
                self.metrics.queue_depth.dec()
                self.metrics.queued_bytes.dec(len(text))
                if response_id is None or response_id not in self.dropped:
                    await self.ws.send_text(text)
                    if audio_s and self._clock is not None and self._clock.response_id == response_id:
                        self._clock.sent_s += audio_s
        finally:
            self.metrics.queue_depth.dec(self.queue.qsize())
            self.metrics.queued_bytes.dec(self.queued_bytes)
            self.queued_bytes = 0
            while not self.queue.empty():
                self.queue.get_nowait()
