"""The `omnitalk` command: serve, make-tiny, bench."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omnitalk.server import logs
from omnitalk.server.settings import ServerSettings

log = logging.getLogger("omnitalk")
logs.quiet_engine_process()  # vLLM's engine processes import this module first
TINY_MODEL_NAME = "omnitalk-tiny-random"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnitalk", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a checkpoint over HTTP and WebSocket")
    serve.add_argument("--model", type=Path, help="local checkpoint directory (default: the built-in tiny model)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--max-model-len", type=int, help="the thinker's context window")
    serve.add_argument("--max-concurrent-streams", type=int, help="beyond it: HTTP 429 / a Realtime error")
    serve.set_defaults(run=_serve)

    tiny = commands.add_parser("make-tiny", help="write the tiny random-weight Qwen2.5-Omni checkpoint to DIR")
    tiny.add_argument("dir", type=Path)
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

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


def _make_tiny(args: argparse.Namespace) -> None:
    from omnitalk.engine.tiny.checkpoint import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dir))


def _bench(args: argparse.Namespace) -> None:
    from omnitalk.clients.bench.cli import main as bench

    raise SystemExit(bench(args.args))


def _chat(args: argparse.Namespace) -> None:
    from omnitalk.clients.chat import main as chat

    raise SystemExit(chat(args.args))


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    overrides = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    settings = ServerSettings(**overrides)
    name = settings.model.name if settings.model else TINY_MODEL_NAME
    logs.start_up(settings)
    if settings.model is None:
        from omnitalk.engine.tiny.checkpoint import tiny_checkpoint

        settings.model = tiny_checkpoint()
    from omnitalk.server.app import create_app  # imports vLLM: after start_up has quieted it
    from omnitalk.server.state import ServerState

    uvicorn.run(
        create_app(ServerState(settings, name)),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.ws_max_size,
        ws_per_message_deflate=False,  # audio does not compress; deflate only costs CPU
    )
