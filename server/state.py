"""What every route shares: the engine (once loaded), the settings, the stream limit, the metrics, the health."""

from __future__ import annotations

from collections.abc import Callable
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
    metrics: Metrics
    active: int = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            self.metrics.shed.inc()
            raise Busy(f"the server is at its limit of {self.limit} concurrent streams")
        self.active += 1
        self.metrics.active_streams.set(self.active)

    def release(self) -> None:
        self.active = max(0, self.active - 1)
        self.metrics.active_streams.set(self.active)


@dataclass(slots=True)
class ServerState:
    settings: ServerSettings
    model_name: str
    engine: OmniEngine | None = None  # None while loading
    limiter: StreamLimiter = field(init=False)
    metrics: Metrics = field(default_factory=Metrics)
    fatal: str | None = None  # why this server stopped serving for good (a failed start, a dead stage), once known
    on_fatal: Callable[[], None] | None = None  # called once the server cannot serve any more: the CLI exits

    def __post_init__(self) -> None:
        self.limiter = StreamLimiter(self.settings.max_concurrent_streams, self.metrics)

    @property
    def failure(self) -> str | None:
        """Why this server cannot serve (start-up failed, a stage is dead), or None."""
        if self.fatal is not None:
            return self.fatal
        return self.engine.failure if self.engine is not None else None
