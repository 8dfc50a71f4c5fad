"""Per-request measurements, the simulated real-time player, SLOs, and per-run aggregates named as vllm bench serve."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

BYTES_PER_AUDIO_SECOND = 48_000  # pcm16 (2 bytes) mono at 24 kHz
PERCENTILES = (50, 90, 95, 99)
CONTINUITY_THRESHOLD_S = 0.1  # vllm-omni's audio_continuity_ok: worst starvation at most 100 ms
# SLO keys: (the per-request value's name, the factor from the SLO's unit to that value's unit).
SLO_KEYS = {
    "ttft": ("ttft_s", 1e-3),
    "tpot": ("tpot_s", 1e-3),
    "e2el": ("e2el_s", 1e-3),
    "ttfa": ("ttfa_s", 1e-3),
    "rtf": ("rtf", 1.0),
    "jitter": ("jitter_s", 1e-3),
    "underrun": ("underrun_worst_s", 1e-3),
    "turn": ("turn_s", 1e-3),
}
SLO_UNITS = {"rtf": ""}  # the rest are in milliseconds


@dataclass(slots=True)
class RequestRecord:
    """What one request measured. Times are seconds: `send_time` from the run's start, the rest from the request's
    start (HTTP: the POST; Realtime: response.create, sent after the input was uploaded)."""

    index: int
    protocol: str
    input_id: str
    send_time: float = 0.0
    concurrency: int = 1  # requests in flight when it was sent, itself included
    offered_rate: float | None = None  # the load's request rate when it was sent (rate, ramp and sweep loads)
    success: bool = False
    error: str | None = None
    ttft_s: float | None = None  # first chunk with non-empty choices (Realtime: first response delta)
    e2el_s: float | None = None  # last chunk with non-empty choices (Realtime: response.done)
    itl_s: list[float] = field(default_factory=list)  # gaps between successive text deltas, from the TTFT chunk
    audio_times_s: list[float] = field(default_factory=list)  # arrival of each non-empty audio chunk
    audio_chunk_bytes: list[int] = field(default_factory=list)  # its decoded pcm16 bytes
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # as the server's usage reports it (omnitalk: text + audio tokens)
    text_tokens: int | None = None
    audio_tokens: int | None = None
    output_text: str = ""
    input_audio_s: float = 0.0
    turn_number: int = 1  # Realtime: the turn's number in its session
    speech_end_s: float | None = None  # Realtime: when the user's speech ended (<= 0: before the request started)

    @property
    def audio_bytes(self) -> int:
        return sum(self.audio_chunk_bytes)

    @property
    def audio_s(self) -> float:
        return self.audio_bytes / BYTES_PER_AUDIO_SECOND

    @property
    def ttfa_s(self) -> float | None:
        """Time to the first audio byte."""
        return self.audio_times_s[0] if self.audio_times_s else None

    @property
    def turn_s(self) -> float | None:
        """Voice-to-voice turn latency: the end of the user's speech to the first audio byte of the answer."""
        if self.ttfa_s is None or self.speech_end_s is None:
            return None
        return self.ttfa_s - self.speech_end_s

    @property
    def rtf(self) -> float | None:
        """(last audio byte's arrival - request start) / audio seconds: < 1 is faster than real time."""
        return self.audio_times_s[-1] / self.audio_s if self.audio_bytes else None

    @property
    def tpot_s(self) -> float | None:
        """(E2EL - TTFT) / (completion_tokens - 1), as vllm; None with fewer than two tokens."""
        if self.e2el_s is None or self.ttft_s is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.completion_tokens - 1)

    @property
    def jitter_s(self) -> float | None:
        """Standard deviation of the gaps between audio chunks (needs three chunks)."""
        gaps = np.diff(self.audio_times_s)
        return float(np.std(gaps)) if len(gaps) >= 2 else None

    @property
    def underrun(self) -> Underrun:
        return simulate_player(self.audio_times_s, [b / BYTES_PER_AUDIO_SECOND for b in self.audio_chunk_bytes])

    def to_json(self) -> dict[str, Any]:
        underrun = self.underrun
        derived = {
            "ttfa_s": self.ttfa_s,
            "turn_s": self.turn_s,
            "tpot_s": self.tpot_s,
            "rtf": self.rtf,
            "jitter_s": self.jitter_s,
            "audio_bytes": self.audio_bytes,
            "audio_s": self.audio_s,
            "underrun_total_s": underrun.total_s,
            "underrun_worst_s": underrun.worst_s,
            "underrun_events": underrun.events,
        }
        return {**asdict(self), **derived}

    def value(self, name: str) -> float | None:
        """A per-request metric by name (an SLO key's value name), underrun ones included."""
        if name == "underrun_worst_s":
            return self.underrun.worst_s if self.audio_times_s else None
        return getattr(self, name)


@dataclass(frozen=True, slots=True)
class Underrun:
    total_s: float  # time the player spent starved, summed
    worst_s: float  # its longest starvation
    events: int  # how many times it ran dry before the stream ended


def simulate_player(arrivals: list[float], durations: list[float]) -> Underrun:
    """A player that starts at the first chunk's arrival and plays every chunk in real time, without a buffer:
    whenever a chunk arrives after everything before it has been played, the gap is a starvation."""
    total, worst, events, played_until = 0.0, 0.0, 0, None
    for arrival, duration in zip(arrivals, durations, strict=True):
        if played_until is not None and arrival > played_until:
            gap = arrival - played_until
            total, worst, events = total + gap, max(worst, gap), events + 1
        played_until = (arrival if played_until is None else max(arrival, played_until)) + duration
    return Underrun(total, worst, events)


def parse_slos(items: list[str]) -> dict[str, float]:
    """`["ttfa:500", "rtf:1"]` -> {"ttfa": 500.0, "rtf": 1.0}; ms for latencies, unitless for rtf."""
    slos: dict[str, float] = {}
    for item in items:
        for part in item.replace(",", " ").split():
            key, sep, raw = part.partition(":")
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"bad SLO {part!r}: expected KEY:VALUE with KEY one of {', '.join(SLO_KEYS)}")
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"bad SLO {part!r}: {raw!r} is not a number") from None
            if not value > 0 or math.isinf(value):
                raise ValueError(f"bad SLO {part!r}: the value must be a positive number")
            slos[key] = value
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Good: succeeded and met every SLO. A missing value fails its SLO (no audio: no TTFA), except TPOT of a
    one-token answer, which counts as 0 as in vllm."""
    if not record.success:
        return False
    for key, limit in slos.items():
        name, scale = SLO_KEYS[key]
        value = record.value(name)
        if value is None and key == "tpot":
            value = 0.0
        if value is None or value > limit * scale:
            return False
    return True


def _stats(prefix: str, suffix: str, values: list[float], scale: float) -> dict[str, float | None]:
    """mean/median/std/pXX of `values` (scaled), vllm's names: mean_ttft_ms, median_ttft_ms, p99_ttft_ms."""
    out: dict[str, float | None] = {}
    array = np.asarray(values, dtype=float) * scale
    for stat in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES)):
        key = f"{stat}_{prefix}{suffix}"
        if not len(array):
            out[key] = None
        elif stat == "mean":
            out[key] = float(np.mean(array))
        elif stat == "median":
            out[key] = float(np.median(array))
        elif stat == "std":
            out[key] = float(np.std(array))
        else:
            out[key] = float(np.percentile(array, float(stat[1:])))
    return out


def _present(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def summarize(records: list[RequestRecord], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    """One run's aggregates. duration: seconds from the run's start to its last request's end."""
    done = [r for r in records if r.success]
    good = [r for r in done if meets_slos(r, slos)]
    duration = max(duration, 1e-9)
    output_tokens = sum(r.completion_tokens or 0 for r in done)
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    audio_s = sum(r.audio_s for r in done)
    underruns = [r.underrun for r in done if r.audio_times_s]
    out: dict[str, Any] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "total_audio_s": audio_s,
        "request_throughput": len(done) / duration,
        "request_goodput": len(good) / duration if slos else None,
        "good_requests": len(good) if slos else None,
        "slo_attainment": len(good) / len(records) if slos and records else None,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "audio_throughput": audio_s / duration,
        "max_concurrency": max((r.concurrency for r in records), default=0),
    }
    out |= _stats("ttft", "_ms", _present([r.ttft_s for r in done]), 1e3)
    out |= _stats("tpot", "_ms", _present([r.tpot_s for r in done]), 1e3)
    out |= _stats("itl", "_ms", [gap for r in done for gap in r.itl_s], 1e3)
    out |= _stats("e2el", "_ms", _present([r.e2el_s for r in done]), 1e3)
    out |= _stats("ttfa", "_ms", _present([r.ttfa_s for r in done]), 1e3)
    out |= _stats("turn", "_ms", _present([r.turn_s for r in done]), 1e3)
    out |= _stats("rtf", "", _present([r.rtf for r in done]), 1.0)
    out |= _stats("jitter", "_ms", _present([r.jitter_s for r in done]), 1e3)
    out |= _stats("underrun", "_ms", [u.worst_s for u in underruns], 1e3)
    out["underrun_total_s"] = sum(u.total_s for u in underruns)
    out["underrun_events"] = sum(u.events for u in underruns)
    ok = [u for u in underruns if u.worst_s <= CONTINUITY_THRESHOLD_S]
    out["continuity_ok_rate"] = len(ok) / len(underruns) if underruns else None
    return out


def turn_latency_by(records: list[RequestRecord], key: str) -> dict[float, dict[str, float | None]]:
    """Turn latency (ms) of the successful requests grouped by `key`: "input_audio_s" (rounded to 100 ms) or
    "turn_number"; per group its count, mean and percentiles, in ascending order of the key."""
    groups: dict[float, list[float]] = {}
    for r in records:
        if r.success and r.turn_s is not None:
            at = round(r.input_audio_s, 1) if key == "input_audio_s" else getattr(r, key)
            groups.setdefault(at, []).append(r.turn_s)
    return {at: {"count": len(v), **_stats("turn", "_ms", v, 1e3)} for at, v in sorted(groups.items())}
