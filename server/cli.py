"""The `omnitalk` command: serve, make-tiny, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omnitalk.server.flags import OneLineParser, add_settings_arguments
from omnitalk.server.scaleout import add_ray_arguments, ray_options, serve_on_ray
from omnitalk.server.settings import ServerSettings

log = logging.getLogger("omnitalk")
TINY_MODEL_NAME = "omnitalk-tiny-random"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """`argv` decides only whether serve's full flags are built (they import vLLM)."""
    parser = OneLineParser(prog="omnitalk", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve a checkpoint over HTTP and WebSocket (serve -h: every setting)",
        description="Serve a Qwen2.5-Omni checkpoint. Flags override OMNITALK_* variables, which override defaults.",
    )
    if argv[:1] == ["serve"]:  # vLLM's argument definitions are imported only for the command that needs them
        add_settings_arguments(serve)
        add_ray_arguments(serve)
    serve.set_defaults(run=_serve)

    tiny = commands.add_parser("make-tiny", help="write the tiny random-weight Qwen2.5-Omni checkpoint to DIR")
    tiny.add_argument("dir", type=Path)
    tiny.set_defaults(run=_make_tiny)

    # Every argument goes to the bench's own parser (`omnitalk bench -h`), imported only when it runs.
    bench = commands.add_parser("bench", help="load-test a server over HTTP chat and Realtime (bench -h: options)",
                                add_help=False, prefix_chars="\0")  # fmt: skip
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    return parser


def _make_tiny(args: argparse.Namespace) -> None:
    from omnitalk.engine.tiny.checkpoint import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dir))


def _bench(args: argparse.Namespace) -> None:
    from omnitalk.clients.bench.cli import main as bench

    raise SystemExit(bench(args.args))


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from omnitalk.engine.omni import check_startup
    from omnitalk.server.app import create_app, engine_config
    from omnitalk.server.state import ServerState

    settings = serve_settings(args)
    name = settings.model.name if settings.model else TINY_MODEL_NAME
    if settings.model is None:
        from omnitalk.engine.tiny.checkpoint import tiny_checkpoint

        settings.model = tiny_checkpoint()
        log.warning(
            "serving the built-in tiny checkpoint at %s: its weights are random, "
            "so its text and audio are noise. Pass --model DIR to serve a real Qwen2.5-Omni checkpoint.",
            settings.model,
        )
    if args.ray:  # each replica checks its own start-up: this machine may lack the GPUs (or even the model)
        serve_on_ray(settings, name, ray_options(args))
        return
    try:
        check_startup(engine_config(settings))
    except ValueError as error:
        raise SystemExit(f"omnitalk serve: error: {error}") from None
    uvicorn.run(
        create_app(ServerState(settings, name)),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.ws_max_size,
        ws_per_message_deflate=False,  # audio does not compress; deflate only costs CPU
    )


def serve_settings(args: argparse.Namespace) -> ServerSettings:
    """The flags given, over OMNITALK_* variables, over defaults; a bad value exits with one line."""
    from pydantic import ValidationError

    given = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    try:
        return ServerSettings(**given)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise SystemExit(f"omnitalk serve: error: {problems}") from None
