"""The `omnitalk` command: serve, make-tiny, bench, chat."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omnitalk.server import logs
from omnitalk.server.flags import OneLineParser, add_settings_arguments
from omnitalk.server.scaleout import add_ray_arguments, ray_options, serve_on_ray
from omnitalk.server.settings import ServerSettings

log = logging.getLogger("omnitalk")
logs.quiet_engine_process()  # vLLM's engine processes import this module first
TINY_MODEL_NAME = "omnitalk-tiny-random"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        logs.quiet_unless_debug(argv)  # before serve's flags import vLLM, which warns as it loads
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
    wide = "wide: a 768-wide, 12-layer thinker, whose prefill costs what a real model's does (default tiny)"
    tiny.add_argument("--size", choices=("tiny", "wide"), default="tiny", help=wide)
    tiny.set_defaults(run=_make_tiny)

    # Every argument goes to the bench's own parser (`omnitalk bench -h`), imported only when it runs.
    bench = commands.add_parser("bench", help="load-test a server over HTTP chat and Realtime (bench -h: options)",
                                add_help=False, prefix_chars="\0")  # fmt: skip
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)

    # A terminal client of a running server; its own parser (`omnitalk chat -h`), like bench's.
    chat = commands.add_parser("chat", help="one spoken turn with a running server (chat -h: options)",
                               add_help=False, prefix_chars="\0")  # fmt: skip
    chat.add_argument("args", nargs=argparse.REMAINDER)
    chat.set_defaults(run=_chat)

    return parser


def _make_tiny(args: argparse.Namespace) -> None:
    from omnitalk.engine.tiny.checkpoint import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dir, args.size))


def _bench(args: argparse.Namespace) -> None:
    from omnitalk.clients.bench.cli import main as bench

    raise SystemExit(bench(args.args))


def _chat(args: argparse.Namespace) -> None:
    from omnitalk.clients.chat import main as chat

    raise SystemExit(chat(args.args))


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from omnitalk.engine.omni import check_startup
    from omnitalk.server.app import create_app, engine_config
    from omnitalk.server.state import ServerState

    settings = serve_settings(args)
    name = settings.model.name if settings.model else TINY_MODEL_NAME
    logs.start_up(settings)
    if settings.model is None:
        from omnitalk.engine.tiny.checkpoint import tiny_checkpoint

        settings.model = tiny_checkpoint()
    if args.ray:  # each replica checks its own start-up: this machine may lack the GPUs (or even the model)
        serve_on_ray(settings, name, ray_options(args))
        return
    try:
        check_startup(engine_config(settings))
    except ValueError as error:
        raise SystemExit(f"omnitalk serve: error: {error}") from None
    state = ServerState(settings, name)
    config = uvicorn.Config(
        create_app(state),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.ws_max_size,
        ws_per_message_deflate=False,  # audio does not compress; deflate only costs CPU
        timeout_graceful_shutdown=5,  # a dead engine must not wait on open WebSockets
    )
    server = uvicorn.Server(config)
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.fatal is not None:  # a supervisor restarts us
        raise SystemExit(f"omnitalk: {state.fatal}")


def serve_settings(args: argparse.Namespace) -> ServerSettings:
    """The flags given, over OMNITALK_* variables, over defaults; a bad value exits with one line."""
    from pydantic import ValidationError

    given = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    try:
        return ServerSettings(**given)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise SystemExit(f"omnitalk serve: error: {problems}") from None
