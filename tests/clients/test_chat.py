"""`omnitalk chat` as a person runs it: the real command against the live server, and its error paths."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import numpy as np
import soundfile

from omnitalk.clients.bench.inputs import RATE, spoken_inputs

OMNITALK = str(Path(sys.executable).parent / "omnitalk")


async def omnitalk_chat(*args: str) -> tuple[int, str, str]:
    """Runs the command without blocking the event loop the live server runs in."""
    process = await asyncio.create_subprocess_exec(
        OMNITALK, "chat", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=600)
    return process.returncode, out.decode(), err.decode()


async def test_a_spoken_question_gets_an_audible_spoken_answer(server, tmp_path: Path) -> None:
    url, _ = server
    question, answer = tmp_path / "question.wav", tmp_path / "answer.wav"
    inputs, _ = spoken_inputs()
    soundfile.write(question, np.frombuffer(inputs[0].audio, "<i2"), RATE, subtype="PCM_16")
    rc, out, err = await omnitalk_chat(
        "Answer briefly.", "--audio", str(question), "--out", str(answer), "--url", url, "--voice", "Ethan",
        "--max-tokens", "8",
    )  # fmt: skip
    assert rc == 0, err
    samples, rate = soundfile.read(answer, dtype="float32")
    assert rate == 24000 and len(samples) > 0
    assert f"speech: {answer} ({len(samples) / rate:.1f} s)" in err
    assert out.endswith("\n")
    rms_dbfs = 10 * np.log10(np.mean(samples.astype(np.float64) ** 2))
    assert rms_dbfs > -40, f"the tiny model's answer is near silent: {rms_dbfs:.1f} dBFS"


async def test_a_refused_request_says_why_and_exits_1(server, tmp_path: Path) -> None:
    url, _ = server
    rc, _, err = await omnitalk_chat("Hi.", "--voice", "nobody", "--url", url, "--out", str(tmp_path / "a.wav"))
    assert rc == 1
    assert "the server refused the request: HTTP 400" in err and "unsupported voice 'nobody'" in err
    assert not (tmp_path / "a.wav").exists()


async def test_an_unreachable_server_says_so_and_exits_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    rc, _, err = await omnitalk_chat("Hi.", "--url", url, "--out", str(tmp_path / "a.wav"))
    assert rc == 2
    assert f"cannot reach the server at {url}" in err


async def test_nothing_to_say_is_a_usage_error() -> None:
    rc, _, err = await omnitalk_chat()
    assert rc == 2
    assert "give a prompt, --audio FILE, or both" in err
