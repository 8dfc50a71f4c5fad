"""`omnitalk serve --ray`: omnitalk as a Ray Serve application. Each replica is today's whole server (thinker on
vLLM, talker, Code2Wav, the FastAPI app) with its GPUs reserved through Ray; Ray Serve's proxy routes both
protocols, autoscales on ongoing requests per replica, and restarts a replica whose health check fails."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from omnitalk.server.settings import ServerSettings

log = logging.getLogger("omnitalk")
APP_NAME = "omnitalk"
REPLICA_HEADER = "x-omnitalk-replica"  # on every HTTP response and WebSocket accept: which replica served it
SCALE_UP_SHARE = 0.75  # of a replica's stream limit: the ongoing requests per replica autoscaling aims at


@dataclass(frozen=True, slots=True)
class RayOptions:
    address: str | None  # an existing cluster (ray://..., host:port, auto); None: a new local one
    gpus_per_replica: float | None  # None: as the settings need (see replica_gpus)
    min_replicas: int
    max_replicas: int


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    ray = parser.add_argument_group("scale-out on Ray Serve (needs the `ray` extra)")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve application: replicas behind one proxy")
    ray.add_argument("--ray-address", metavar="ADDRESS", help="join this Ray cluster (default: start a local one)")
    ray.add_argument(
        "--gpus-per-replica",
        type=float,
        metavar="N",
        help="GPUs Ray reserves per replica, fractions allowed (default: tensor-parallel-size, plus "
        "the speech stage's own GPU if --speech-device names one; 0 on a cluster without GPUs)",
    )
    ray.add_argument("--min-replicas", type=int, default=1, metavar="N", help="replicas kept running (default: 1)")
    ray.add_argument("--max-replicas", type=int, metavar="N", help="autoscaling's ceiling (default: --min-replicas)")


def ray_options(args: argparse.Namespace) -> RayOptions:
    top = args.min_replicas if args.max_replicas is None else args.max_replicas
    if not 1 <= args.min_replicas <= top:
        raise SystemExit("omnitalk serve: error: need 1 <= --min-replicas <= --max-replicas")
    if args.gpus_per_replica is not None and args.gpus_per_replica < 0:
        raise SystemExit("omnitalk serve: error: --gpus-per-replica cannot be negative")
    return RayOptions(args.ray_address, args.gpus_per_replica, args.min_replicas, top)


def replica_gpus(settings: ServerSettings, cluster_gpus: float) -> float:
    """The thinker's tensor-parallel group, and one more GPU index if the speech stage is put on `cuda:N` beyond
    it. Inside a replica Ray sets CUDA_VISIBLE_DEVICES, so `cuda:N` counts the replica's own GPUs."""
    if cluster_gpus == 0:
        return 0
    device = settings.speech_device
    speech = int(device.removeprefix("cuda:")) + 1 if device.startswith("cuda:") else 0
    return max(settings.tensor_parallel_size, speech)


def deployment_options(settings: ServerSettings, options: RayOptions, gpus: float) -> dict[str, Any]:
    """Ray Serve's options for the replica deployment: a full replica (at its stream limit) is not chosen."""
    limit = settings.max_concurrent_streams
    scaling: dict[str, Any] = {"num_replicas": options.min_replicas}
    if options.max_replicas > options.min_replicas:
        target = max(1, math.floor(SCALE_UP_SHARE * limit))
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": target,
            }
        }
    return {"ray_actor_options": {"num_gpus": gpus}, "max_ongoing_requests": limit, **scaling}


def build_app(settings: ServerSettings, name: str, options: RayOptions, gpus: float) -> Any:
    """The bound Ray Serve application (`serve.run` starts it)."""
    from omnitalk.server.ray_replica import OmnitalkReplica

    return OmnitalkReplica.options(**deployment_options(settings, options, gpus)).bind(settings, name)


def serve_on_ray(settings: ServerSettings, name: str, options: RayOptions) -> None:
    """Starts (or joins) the Ray cluster, deploys, and blocks until interrupted."""
    import ray
    from ray import serve

    ray.init(address=options.address, include_dashboard=False)
    gpus = (
        replica_gpus(settings, ray.cluster_resources().get("GPU", 0))
        if options.gpus_per_replica is None
        else (options.gpus_per_replica)
    )
    log.info("%d-%d replica(s), %g GPU(s) each", options.min_replicas, options.max_replicas, gpus)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(build_app(settings, name, options, gpus), name=APP_NAME, route_prefix="/", blocking=True)
    finally:
        serve.shutdown()


class ReplicaHeader:
    """ASGI middleware: REPLICA_HEADER on HTTP responses and WebSocket accepts."""

    def __init__(self, app: Callable[..., Awaitable[None]], replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable, send: Callable) -> None:
        async def tagged(message: MutableMapping[str, Any]) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] in ("http", "websocket") else send)
