"""Which work goes next: the stream whose listener runs out of audio first decides.

A stream's playback deadline is the wall time at which a client that started playing at the first
audio chunk has played everything sent so far; before its first chunk, its arrival time (the longer
it has waited, the more urgent it is). Work comes in two kinds, each batched across streams: a talker
step (one codec token, 20 ms of audio, for every stream whose talker input is ready) and a Code2Wav
batch (the next audio chunk of every stream with a full window of codes). The most urgent stream that
can make progress picks the kind: its own bottleneck runs, and every other stream ready for the same
kind rides along in the batch, most urgent first.

A Code2Wav batch holds off every talker step while it runs, so the wait of talker-ready streams that are
playing is bounded: by half the least slack (deadline - now) among them, never under one talker step's
audio. (Streams not playing yet cannot underrun; their deadline, the arrival time, already ranks them
first.) A Code2Wav batch is cut to what fits in the rest
of that bound, its cost predicted from the measured cost per row of earlier batches (at least one row
runs); once the talker-ready streams have waited the whole bound, the talker steps next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

SAMPLE_RATE = 24_000
STEP_AUDIO_S = 0.02  # audio one talker step adds to a stream (one 50 Hz code)


@dataclass(slots=True)
class PlaybackClock:
    arrived_at: float
    first_audio_at: float | None = None
    samples_sent: int = 0

    def deadline(self) -> float:
        if self.first_audio_at is None:
            return self.arrived_at
        return self.first_audio_at + self.samples_sent / SAMPLE_RATE

    def sent(self, num_samples: int, now: float) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = now
        self.samples_sent += num_samples


class Work(Enum):
    TALKER_STEP = 1
    CODE2WAV = 2


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live stream as the policy sees it."""

    key: str
    deadline: float
    talker_ready: bool
    code2wav_ready: bool
    playing: bool = False  # its first audio has been sent: a late talker step can make its listener wait


def pause_bound(candidates: list[Candidate], now: float) -> float:
    """The longest Code2Wav may hold off the talker now (inf when no playing stream waits for a step)."""
    slacks = [c.deadline - now for c in candidates if c.talker_ready and c.playing]
    return max(min(slacks) / 2, STEP_AUDIO_S) if slacks else math.inf


def choose(
    candidates: list[Candidate],
    max_batch: int,
    now: float = 0.0,
    code2wav_row_s: float = 0.0,
    talker_waited_s: float = 0.0,
) -> tuple[Work, list[str]] | None:
    """The kind of work to run next and the streams in its batch, most urgent first; None when idle.

    `code2wav_row_s` is the predicted Code2Wav cost per row (0: unknown, the batch is not cut) and
    `talker_waited_s` how long talker-ready streams have already waited: once that reaches the pause bound,
    the talker steps next whatever the deadlines say.
    """
    urgent = sorted((c for c in candidates if c.talker_ready or c.code2wav_ready), key=lambda c: c.deadline)
    if not urgent:
        return None
    work = Work.CODE2WAV if urgent[0].code2wav_ready else Work.TALKER_STEP
    limit = max_batch
    if work is Work.CODE2WAV:
        left = pause_bound(candidates, now) - talker_waited_s
        if left <= 0:
            work = Work.TALKER_STEP
        elif code2wav_row_s > 0 and left < math.inf:
            limit = min(limit, max(1, int(left / code2wav_row_s)))
    ready = [c.key for c in urgent if (c.code2wav_ready if work is Work.CODE2WAV else c.talker_ready)]
    return work, ready[:limit]
