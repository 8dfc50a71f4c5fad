"""`omnitalk serve`'s own start-up lines, and quiet third-party logging unless the log level is debug."""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omnitalk.engine.omni import OmniEngine
    from omnitalk.server.settings import ServerSettings

log = logging.getLogger("omnitalk")
# Read by vLLM's and transformers' loggers in this process and in vLLM's engine processes, which inherit them.
QUIET_ENVIRONMENT = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
    "OMNITALK_QUIET": "1",
}


def quiet_engine_process() -> None:
    """In a process that vLLM spawned from a quiet `omnitalk serve`: vLLM warns while it is imported, before it
    applies VLLM_LOGGING_LEVEL, so its logger is quieted first. Spawned processes import the main module (the
    `omnitalk` command, so server/cli.py) before anything else, which is where this is called."""
    if os.environ.get("OMNITALK_QUIET") == "1":
        _quiet_loggers()


def _quiet_loggers() -> None:
    for name in ("vllm", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_unless_debug(argv: list[str]) -> None:
    """Before vLLM or transformers are imported: silences what they are expected to say (dtype casts of the tiny
    model, Triton missing on a CPU, deprecations) unless `serve`'s log level (flag or OMNITALK_LOG_LEVEL) is
    debug. It reads the level from the raw arguments: parsing serve's flags imports vLLM."""
    level = os.environ.get("OMNITALK_LOG_LEVEL", "info")
    for i, arg in enumerate(argv):
        if arg == "--log-level" and i + 1 < len(argv):
            level = argv[i + 1]
        elif arg.startswith("--log-level="):
            level = arg.split("=", 1)[1]
    if level.lower() == "debug":
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG")
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.simplefilter("ignore")
    _quiet_loggers()


def start_up(settings: ServerSettings) -> None:
    """Says what is served where."""
    if settings.model is None:
        log.info("model: omnitalk-tiny-random, the built-in tiny checkpoint: random weights, so its text and audio")
        log.info("       are noise (pass --model DIR to serve a real Qwen2.5-Omni checkpoint)")
    else:
        log.info("model: %s", settings.model)
    root = f"http://{settings.host}:{settings.port}"
    log.info("demo page: %s/   API: %s/v1   metrics: %s/metrics", root, root, root)
    log.info("loading the engine (about a minute on a CPU)...")


def ready(engine: OmniEngine, seconds: float) -> None:
    """Where each stage runs and in which dtype, then "ready"."""
    from vllm.platforms import current_platform

    talker, code2wav = engine.speech.talker, engine.speech.code2wav
    thinker_dtype = str(engine.thinker.llm.model_config.dtype).removeprefix("torch.")
    log.info("thinker: vLLM on %s, %s", current_platform.device_type, thinker_dtype)
    pool = talker.runner.pool
    pool_gib = pool.numel() * pool.element_size() / 2**30
    log.info("talker: %s, %s, KV pool %.2f GiB", pool.device, str(pool.dtype).removeprefix("torch."), pool_gib)
    vocoder_dtype = str(next(code2wav.vocoder.parameters()).dtype).removeprefix("torch.")
    log.info("code2wav: %s, %s", code2wav.device, vocoder_dtype)
    log.info("ready in %.1f s", seconds)
