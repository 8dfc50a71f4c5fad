"""The `omnitalk` command: serve, make-tiny."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omnitalk.server.settings import ServerSettings

log = logging.getLogger("omnitalk")
TINY_MODEL_NAME = "omnitalk-tiny-random"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnitalk", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a checkpoint over HTTP and WebSocket")
    serve.add_argument("--model", type=Path, help="local checkpoint directory (default: the built-in tiny model)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=_serve)

    tiny = commands.add_parser("make-tiny", help="write the tiny random-weight Qwen2.5-Omni checkpoint to DIR")
    tiny.add_argument("dir", type=Path)
    tiny.set_defaults(run=_make_tiny)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


def _make_tiny(args: argparse.Namespace) -> None:
    from omnitalk.engine.tiny.checkpoint import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dir))


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from omnitalk.server.app import MISSING, create_app

    overrides = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    settings = ServerSettings(**overrides)
    if settings.model is None:
        from omnitalk.engine.tiny.checkpoint import tiny_checkpoint

        model_dir, name = tiny_checkpoint(), TINY_MODEL_NAME
        log.warning(
            "serving the built-in tiny checkpoint at %s: its weights are random, "
            "so its text and audio are noise. Pass --model DIR to serve a real Qwen2.5-Omni checkpoint.",
            model_dir,
        )
    else:
        model_dir, name = settings.model, settings.model.name
    log.warning(MISSING)
    uvicorn.run(create_app(model_dir, name), host=settings.host, port=settings.port, log_level=settings.log_level)
