"""One Ray Serve replica of `omnitalk serve --ray`: the whole engine and app, a health check and Ray metrics.
Imports Ray: only `omnitalk.server.scaleout` imports this module, and only for `--ray`."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from ray import serve
from ray.serve import metrics as ray_metrics

from omnitalk.engine.omni import OmniEngine, check_startup
from omnitalk.server.app import create_app, engine_config
from omnitalk.server.scaleout import ReplicaHeader
from omnitalk.server.settings import ServerSettings
from omnitalk.server.state import ServerState

log = logging.getLogger("omnitalk")
METRICS_INTERVAL_S = 1.0  # how often a replica copies its figures into Ray's metrics export


@serve.deployment(name="omnitalk", health_check_period_s=2, health_check_timeout_s=30)
@serve.ingress()
class OmnitalkReplica:
    async def __init__(self, settings: ServerSettings, name: str) -> None:
        # Loaded before the replica reports itself started, so that Ray routes nothing to a loading engine.
        config = engine_config(settings)
        check_startup(config)  # a ValueError fails this replica's start with its one line
        engine = await asyncio.to_thread(OmniEngine.start, config)
        self.state = ServerState(settings, name, engine=engine)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._exporter = asyncio.get_running_loop().create_task(_export(self.state))
        log.info("replica %s ready: serving %s", self.replica, name)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.state)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    def check_health(self) -> None:
        """Ray restarts the replica when this raises: the same condition that makes the app's /health 503."""
        failure = self.state.failure
        if failure is not None:
            raise RuntimeError(f"replica {self.replica}: {failure}")

    def __del__(self) -> None:
        self._exporter.cancel()
        assert self.state.engine is not None  # set in __init__
        self.state.engine.shutdown()


async def _export(state: ServerState) -> None:
    """Ray tags each series with its deployment and replica, so one scrape of Ray's metrics export gives every
    replica's figures; totals are sums over the replica tag. Latencies go as running sums and counts (a mean per
    replica); the full histograms stay on each replica's own /metrics."""
    live = ray_metrics.Gauge("omnitalk_live_streams", description="Streams this replica serves now")
    totals = {
        (hist, part): ray_metrics.Counter(f"omnitalk_{name}_{part}", description=f"{doc} ({part})")
        for hist, name, doc in (
            (state.metrics.ttfp, "audio_ttfp_s", "Request start to first audio packet, seconds"),
            (state.metrics.rtf, "audio_rtf", "Generation time / audio duration"),
        )
        for part in ("sum", "count")
    }
    seen = dict.fromkeys(totals, 0.0)
    while True:
        live.set(state.limiter.active)
        for (hist, part), counter in totals.items():
            value = next(s.value for s in hist.collect()[0].samples if s.name.endswith("_" + part))
            if value > seen[hist, part]:
                counter.inc(value - seen[hist, part])
                seen[hist, part] = value
        await asyncio.sleep(METRICS_INTERVAL_S)
