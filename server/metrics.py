"""Prometheus metrics; names follow vllm-omni's (`vllm:omni_audio_ttfp_s`, ...) under an `omnitalk:` prefix."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

if TYPE_CHECKING:
    from omnitalk.engine.omni import OmniEngine

SAMPLE_RATE = 24_000
_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "omnitalk:time_to_first_token_s", "Request start to first text", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttfp = Histogram(
            "omnitalk:audio_ttfp_s", "Request start to first audio packet", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.rtf = Histogram(
            "omnitalk:audio_rtf",
            "Generation time / audio duration",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 5),
            registry=r,
        )
        self.underrun = Histogram(
            "omnitalk:audio_underrun_s", "Worst starvation of a real-time player started at the first packet",
            buckets=(0, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=r,
        )  # fmt: skip
        self.live_streams = Gauge("omnitalk:live_streams", "Responses being generated", registry=r)
        self.queue_depth = Gauge("omnitalk:queue_depth", "Outgoing events queued for slow clients", registry=r)
        self.queued_bytes = Gauge("omnitalk:queued_bytes", "Bytes of outgoing events queued", registry=r)
        self.active_streams = Gauge("omnitalk:active_streams", "Stream-limit slots held", registry=r)
        self.shed = Counter("omnitalk:shed_requests", "Requests refused at the stream limit (429)", registry=r)
        self.slow_clients = Counter("omnitalk:dropped_clients", "Realtime clients dropped for lag", registry=r)
        self.prompt_tokens = Counter("omnitalk:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("omnitalk:generation_tokens", "Text tokens generated", registry=r)
        self.audio_tokens = Counter("omnitalk:audio_tokens", "Codec tokens generated (50 per audio second)", registry=r)
        self.requests = Counter("omnitalk:requests", "Finished responses", ["status"], registry=r)
        self.ingested_turns = Counter(
            "omnitalk:ingested_turns", "Realtime turns ingested while spoken, by how they were answered: session "
            "(from the prefilled session) or fallback (the conversation sent at once)", ["answer"], registry=r,
        )  # fmt: skip
        self.thinker_cached_tokens = Counter(
            "omnitalk:thinker_cached_tokens", "Realtime prompt tokens the thinker served from its prefix cache (for "
            "a spoken turn: its session's earlier turns, with their stored hidden-state rows)", registry=r,
        )  # fmt: skip
        self.ingested_blocks = Counter(
            "omnitalk:ingested_blocks", "2 s blocks of user audio prefilled before the turn ended", registry=r
        )
        self.ingest_fallbacks = Counter(
            "omnitalk:ingest_fallbacks", "Ingested turns answered by the conversation sent at once, by why",
            ["reason"], registry=r,
        )  # fmt: skip
        self.ingest_restarts = Counter(
            "omnitalk:ingest_restarts", "Ingest sessions restarted because a later, louder block moved the clamp "
            "of a block already prefilled", registry=r,
        )  # fmt: skip
        self.ingest_prefilled = Gauge(
            "omnitalk:ingest_prefilled_blocks", "2 s blocks of user audio held prefilled by open ingest sessions",
            registry=r,
        )  # fmt: skip

        self.engine_counters = EngineCounters()
        r.register(self.engine_counters)

    def ingested(self, fallback: str | None, prefilled_blocks: int) -> None:
        """An ingested turn was answered: from its session (fallback None) or sent at once."""
        self.ingested_turns.labels("fallback" if fallback else "session").inc()
        if fallback is None:
            self.ingested_blocks.inc(prefilled_blocks)
        else:
            self.ingest_fallbacks.labels(fallback).inc()

    def render(self, engine: OmniEngine | None = None) -> bytes:
        self.engine_counters.engine = engine
        return generate_latest(self.registry)


class EngineCounters:
    """Counters the engine keeps itself, read at each scrape."""

    def __init__(self) -> None:
        self.engine: OmniEngine | None = None

    def collect(self) -> Iterator[Metric]:
        if self.engine is not None:
            yield CounterMetricFamily(
                "omnitalk:talker_cached_tokens", "Prompt positions the talker took from a Realtime session's cached "
                "prompt blocks instead of computing them", value=self.engine.speech.talker.num_cached_tokens,
            )  # fmt: skip
            yield CounterMetricFamily(
                "omnitalk:talker_ahead_tokens", "Prompt positions the talker prefilled into a Realtime session's "
                "cached prompt blocks while the turn was spoken", value=self.engine.speech.talker.num_ahead_tokens,
            )  # fmt: skip


@dataclass(slots=True)
class ResponseTimer:
    """Times one response as it streams out; `finish` records it. A listener starts at the first packet."""

    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    first_text: float | None = None
    first_audio: float | None = None
    samples: int = 0
    worst_underrun: float = 0.0

    def text(self) -> None:
        if self.first_text is None:
            self.first_text = time.monotonic()
            self.metrics.ttft.observe(self.first_text - self.started)

    def audio(self, num_samples: int) -> None:
        now = time.monotonic()
        if self.first_audio is None:
            self.first_audio = now
            self.metrics.ttfp.observe(now - self.started)
        else:  # the player has run dry if it has played everything sent before this packet
            self.worst_underrun = max(self.worst_underrun, now - (self.first_audio + self.samples / SAMPLE_RATE))
        self.samples += num_samples

    def finish(self, status: str, prompt_tokens: int = 0, text_tokens: int = 0, audio_tokens: int = 0) -> None:
        m = self.metrics
        m.requests.labels(status).inc()
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(text_tokens)
        m.audio_tokens.inc(audio_tokens)
        if self.samples:
            m.rtf.observe((time.monotonic() - self.started) / (self.samples / SAMPLE_RATE))
            m.underrun.observe(self.worst_underrun)
