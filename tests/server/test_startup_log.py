"""`omnitalk serve` as a person starts it: a few lines of its own, none of the expected third-party noise."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

OMNITALK = str(Path(sys.executable).parent / "omnitalk")
# The expected warnings start-up silences (still there: torch's C++ NUMA note and vLLM's shard progress bar).
NOISE = ("Attempted to load weight", "Triton", "[transformers]", "DeprecationWarning", "WARNING")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_says_what_it_serves_where_and_when_it_is_ready() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY")}
    env |= {"OMNITALK_MAX_NUM_SEQS": "2"}
    process = subprocess.Popen(
        [OMNITALK, "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        for line in process.stdout:  # guarded by pytest's timeout
            lines.append(line.rstrip("\n"))
            if " ready in " in line:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
                break
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    log = "\n".join(lines)
    assert " ready in " in log, log
    root = f"http://127.0.0.1:{port}"
    assert "omnitalk: model: omnitalk-tiny-random, the built-in tiny checkpoint: random weights" in log
    assert f"demo page: {root}/   API: {root}/v1   metrics: {root}/metrics" in log
    assert re.search(r"thinker: vLLM on cpu, \w+", log), log
    assert re.search(r"talker: cpu, float32", log) and re.search(r"code2wav: cpu, float32", log), log
    assert re.search(r"ready in \d+\.\d s", log), log
    assert [noise for noise in NOISE if noise in log] == [], log
    assert page.status_code == 200 and "omnitalk voice demo" in page.text
