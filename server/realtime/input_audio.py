"""The input audio buffer's 16 kHz audio, resampled append by append, and the user turn ingested from it.

A committed item takes its samples from this stream (`InputBuffer.take`), and the turn being ingested
(`ThinkerIngest`) was pushed the same stream's samples between the same indices: the item is exactly what the
thinker prefilled, so `ThinkerIngest.finish` answers from its session. Resampled from the buffer's start and
flushed, the stream equals the whole buffer resampled at once (`media.load_audio`; pinned by a test), so a
manually committed buffer gives the same item as before; a VAD turn is a slice of the stream (the filter saw the
audio before the slice's start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import av
import numpy as np

from omnitalk.engine.omni import OmniEngine
from omnitalk.engine.request import Message
from omnitalk.engine.thinker.engine import ThinkerInputError
from omnitalk.engine.thinker.streaming import ThinkerIngest
from omnitalk.server.metrics import Metrics

log = logging.getLogger(__name__)

RATE = 16_000


class Resampled:
    """A 24 kHz pcm16 stream at 16 kHz (libswresample): samples `first` to `produced` of the output are kept."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=RATE)
        self._data = np.zeros(RATE, np.float32)
        self._offset = 0  # the output index of _data[0]
        self.first = 0
        self.produced = 0

    def push(self, pcm: bytes) -> None:
        if not pcm:
            return
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, "<i2").reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 24_000
        self._store(self._resampler.resample(frame))

    def flush(self) -> None:
        """Outputs the resampler's buffered tail; nothing may be pushed after it."""
        self._store(self._resampler.resample(None))

    def _store(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            values = np.clip(frame.to_ndarray()[0], -1.0, 1.0)  # as media.load_audio: the filter can ring past 1
            end = self.produced + len(values)
            if end - self._offset > len(self._data):
                kept = self._data[self.first - self._offset : self.produced - self._offset]
                self._data = np.zeros(max(2 * len(kept), len(kept) + len(values), RATE), np.float32)
                self._data[: len(kept)] = kept
                self._offset = self.first
            self._data[self.produced - self._offset : end - self._offset] = values
            self.produced = end

    def drop_before(self, index: int) -> None:
        self.first = max(self.first, min(index, self.produced))

    def slice(self, begin: int, end: int) -> np.ndarray:
        """A copy of output samples begin to end, clipped to those kept."""
        begin, end = max(begin, self.first), min(end, self.produced)
        return self._data[begin - self._offset : max(begin, end) - self._offset].copy()


@dataclass(slots=True)
class Turn:
    """A user turn being ingested: its audio is `audio`'s samples from `begin`, of which `sent` went to the thinker."""

    ingest: ThinkerIngest
    audio: Resampled
    begin: int
    sent: int = 0

    def push(self, limit: int) -> None:
        samples = self.audio.slice(self.begin + self.sent, limit)
        if len(samples):
            self.ingest.push_audio(samples)
            self.sent += len(samples)


@dataclass(slots=True)
class Progress:
    """An ingest's progress in the server's metrics, as it happens (`streaming.IngestListener`)."""

    metrics: Metrics

    def prefilled(self, blocks: int) -> None:
        self.metrics.ingest_prefilled.inc(blocks)

    def restarted(self) -> None:
        self.metrics.ingest_restarts.inc()


class Ingestion:
    """A Realtime session's streaming input: the turn being spoken, and a committed one waiting for its response."""

    def __init__(self, engine: OmniEngine, enabled: bool, metrics: Metrics) -> None:
        self.engine, self.enabled = engine, enabled
        self._progress = Progress(metrics)
        self.turn: Turn | None = None
        self.ready: ThinkerIngest | None = None

    async def open(self, request_id: str, history: tuple[Message, ...], hidden: bool, audio: Resampled, begin: int,
                   session: str | None):  # fmt: skip
        """Starts ingesting a turn whose audio begins at `audio`'s sample `begin` (any turn still open is closed);
        `session`: the Realtime session whose state it reuses and extends (None: salted alone)."""
        await self.drop()
        await self._close_ready()
        ingest = self.engine.ingest(request_id, history, hidden_states=hidden, session=session, listener=self._progress)
        try:
            await ingest.start()
        except ThinkerInputError as error:  # the request sent at commit will say so; nothing is ingested
            log.info("realtime: the turn is not ingested: %s", error)
            return
        self.turn = Turn(ingest, audio, begin)

    def push(self, limit: int | None = None) -> None:
        """Sends the open turn its samples up to output index `limit` (None: all produced)."""
        if self.turn is not None:
            self.turn.push(self.turn.audio.produced if limit is None else limit)

    def before_take(self, audio: Resampled, begin: int) -> Turn | None:
        """The open turn, if the buffer's next commit starts where it does (else it is of no use: closed later)."""
        turn = self.turn
        return turn if turn is not None and turn.audio is audio and turn.begin == begin else None

    async def committed(self, turn: Turn | None, samples: np.ndarray | None) -> None:
        """The buffer's audio from the turn's start became an item of `samples` (None: no item): the turn gets
        the rest of them and waits for its response."""
        open_turn, self.turn = self.turn, None
        if turn is None or samples is None or turn.sent > len(samples):
            if open_turn is not None:
                await open_turn.ingest.close()
            return
        if len(samples) > turn.sent:
            turn.ingest.push_audio(samples[turn.sent :])
        await self._close_ready()
        self.ready = turn.ingest

    def hand_over(self) -> ThinkerIngest | None:
        """The committed turn's ingest, for the response that answers it."""
        ready, self.ready = self.ready, None
        return ready

    async def drop(self) -> None:
        """The open turn ends without a commit (clear, a reset detector, barge-in's new turn)."""
        if self.turn is not None:
            turn, self.turn = self.turn, None
            await turn.ingest.close()

    async def _close_ready(self) -> None:
        if self.ready is not None:
            ready, self.ready = self.ready, None
            await ready.close()

    async def close(self) -> None:
        await self.drop()
        await self._close_ready()
