"""Which work goes next: the stream whose listener runs out of audio first decides.

A stream's playback deadline is the wall time at which a client that started playing at the first
audio chunk has played everything sent so far; before its first chunk, its arrival time (the longer
it has waited, the more urgent it is). Work comes in two kinds, each batched across streams: a talker
step (one codec token, 20 ms of audio, for every stream whose talker input is ready) and a Code2Wav
batch (the next audio chunk of every stream with a full window of codes). The most urgent stream that
can make progress picks the kind: its own bottleneck runs, and every other stream ready for the same
kind rides along in the batch, most urgent first.

A Code2Wav batch holds off every talker step while it runs, so the wait of the streams whose next audio
needs the talker (playing, talker-ready and without a chunk to decode) is bounded by their margin: the slack
(deadline - now) less what their next chunk still costs once the talker runs (its missing codes' steps and
its own Code2Wav row, at the measured costs). The bound is half the least margin, never under one talker
step's audio. Streams not playing yet cannot underrun (their deadline, the arrival time, already ranks them
first); a stream with a chunk to decode waits for Code2Wav, not for the talker; and a stream with no margin
left is late whatever runs now, and cutting batches would only slow every stream (an overloaded stage would
decode one row at a time): none of these cuts a batch. A Code2Wav batch is cut to what fits in the rest of
the bound, its cost predicted from the measured cost per row of earlier batches (at least one row runs);
once the talker-bound streams have waited the whole bound, the talker steps next.
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
    codes_needed: int = 0  # talker steps before its next chunk can be decoded


@dataclass(frozen=True, slots=True)
class Costs:
    """Measured costs (0: not measured yet)."""

    code2wav_row_s: float = 0.0  # predicted Code2Wav cost per row
    talker_step_s: float = 0.0  # one batched talker step


def pause_bound(candidates: list[Candidate], now: float, costs: Costs | None = None) -> float:
    """The longest Code2Wav may hold off the talker now (inf when no talker-bound stream has margin left)."""
    costs = costs or Costs()
    margins = [
        c.deadline - now - c.codes_needed * costs.talker_step_s - costs.code2wav_row_s for c in talker_bound(candidates)
    ]
    margins = [m for m in margins if m > 0]
    return max(min(margins) / 2, STEP_AUDIO_S) if margins else math.inf


def talker_bound(candidates: list[Candidate]) -> list[Candidate]:
    """Playing streams whose next audio waits on talker steps alone: ready for one, no chunk to decode."""
    return [c for c in candidates if c.talker_ready and c.playing and not c.code2wav_ready]


def choose(
    candidates: list[Candidate],
    max_batch: int,
    now: float = 0.0,
    costs: Costs | None = None,
    talker_waited_s: float = 0.0,
) -> tuple[Work, list[str]] | None:
    """The kind of work to run next and the streams in its batch, most urgent first; None when idle.

    Without a measured Code2Wav cost the batch is not cut. `talker_waited_s` is how long talker-bound streams
    have already waited: once that reaches the pause bound, the talker steps next whatever the deadlines say.
    """
    urgent = sorted((c for c in candidates if c.talker_ready or c.code2wav_ready), key=lambda c: c.deadline)
    if not urgent:
        return None
    work = Work.CODE2WAV if urgent[0].code2wav_ready else Work.TALKER_STEP
    limit = max_batch
    if work is Work.CODE2WAV:
        left = pause_bound(candidates, now, costs) - talker_waited_s
        if left <= 0:
            work = Work.TALKER_STEP
        elif costs is not None and costs.code2wav_row_s > 0 and left < math.inf:
            limit = min(limit, max(1, int(left / costs.code2wav_row_s)))
    ready = [c.key for c in urgent if (c.code2wav_ready if work is Work.CODE2WAV else c.talker_ready)]
    return work, ready[:limit]
