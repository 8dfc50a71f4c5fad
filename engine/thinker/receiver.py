"""The API process's end of the hidden-state tap: a plain ZMQ PULL socket read from the event loop's own reader
callback, every queued message at once.

pyzmq's asyncio socket costs a future, its callbacks, several `EVENTS` reads and a task wake-up per message;
here the socket's file descriptor is watched with `loop.add_reader` and one callback decodes all that is
queued and hands it over in one call, so the streams it feeds wake once per drain instead of once per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import torch
import zmq

from omnitalk.engine.thinker import rows as wire

Decoded = tuple[list[tuple[wire.RowSpan, torch.Tensor]], dict[str, torch.Tensor], list[str]]  # wire.decode's
# At most this many messages per callback (the rest in the next loop iteration), so that a flood of steps
# cannot keep the event loop from everything else.
MAX_MESSAGES_PER_DRAIN = 64


class RowReceiver:
    def __init__(self, address: str) -> None:
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        self._socket.bind(address)
        self._fd = self._socket.getsockopt(zmq.FD)
        self._loop: asyncio.AbstractEventLoop | None = None  # while a `run` watches the socket

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._loop = None
        self._socket.close(linger=0)

    async def run(self, deliver: Callable[[list[Decoded]], None]) -> None:
        """Calls `deliver` with the messages of each drain, in arrival order, until cancelled; if a drain or
        `deliver` raises, stops watching the socket and raises that."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if ended.done():
                return
            try:
                messages, more = self._drain()
                if messages:
                    deliver(messages)
            except Exception as error:
                ended.set_exception(error)
                return
            if more:
                loop.call_soon(on_readable)

        loop.add_reader(self._fd, on_readable)
        self._loop = loop
        try:
            on_readable()  # messages queued before the reader was added raised their edge already
            await ended
        finally:
            if self._loop is loop:  # not closed meanwhile
                loop.remove_reader(self._fd)
                self._loop = None

    def _drain(self) -> tuple[list[Decoded], bool]:
        """The queued messages, decoded (at most MAX_MESSAGES_PER_DRAIN), and whether more may be queued.
        The socket's descriptor is edge-triggered, and any operation on the socket may consume its edge: only
        `EVENTS` without POLLIN, read after the last receive, says the next message will raise a new one."""
        messages = []
        while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            if len(messages) == MAX_MESSAGES_PER_DRAIN:
                return messages, True
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:  # POLLIN said otherwise: look again in the next loop iteration
                return messages, True
            messages.append(wire.decode([frame.buffer for frame in frames]))  # views of the frames: no copy
        return messages, False
