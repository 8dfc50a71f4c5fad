"""What every route shares: the engine (once loaded), the settings, the stream limit and the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from omnitalk.engine.omni import OmniEngine
from omnitalk.server.metrics import Metrics
from omnitalk.server.settings import ServerSettings


class Busy(Exception):
    """The server runs its maximum number of streams; try again after `retry_after` seconds."""

    retry_after = 1


@dataclass(slots=True)
class StreamLimiter:
    limit: int
    active: int = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise Busy(f"the server is at its limit of {self.limit} concurrent streams")
        self.active += 1

    def release(self) -> None:
        self.active = max(0, self.active - 1)


@dataclass(slots=True)
class ServerState:
    settings: ServerSettings
    model_name: str
    engine: OmniEngine | None = None  # None while loading
    limiter: StreamLimiter = field(init=False)
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.limiter = StreamLimiter(self.settings.max_concurrent_streams)

    @property
    def failure(self) -> str | None:
        """Why this server cannot serve (its thinker engine died), or None."""
        if self.engine is not None and self.engine.thinker.llm.errored:
            return "the thinker engine is dead"
        return None
