"""The voice demo page at GET /, driven in headless Chromium with a fake microphone that speaks a wav file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from omnitalk.clients.bench.inputs import RATE, spoken_inputs

CHROMIUM = "/usr/bin/chromium"
TURN_TIMEOUT_MS = 600_000  # a guard against a hang, not a measurement: the tiny model on a loaded CPU is slow


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed where missing (CI runs as root); never a browser build downloaded by playwright."""
    if not Path(CHROMIUM).exists():
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip("chromium is not installed and apt-get is unavailable here (or not root) to install it")
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, timeout=1200, env=env)
    return CHROMIUM


@pytest.fixture
def spoken_wav(tmp_path: Path) -> Path:
    """A spoken question (espeak-ng, or a voiced synthetic signal) followed by silence, so that VAD ends the turn.
    Chromium loops the file, so the question comes again and barges in on the answer."""
    inputs, _ = spoken_inputs()
    speech = np.frombuffer(inputs[0].audio, dtype="<i2")
    samples = np.concatenate([np.zeros(RATE // 2, "<i2"), speech, np.zeros(4 * RATE, "<i2")])
    path = tmp_path / "question.wav"
    soundfile.write(path, samples, RATE, subtype="PCM_16")
    return path


async def test_a_spoken_turn_in_the_browser(server, chromium: str, spoken_wav: Path, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    url, _ = server
    args = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={spoken_wav}",
    ]  # fmt: skip
    errors: list[str] = []
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=args
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(f"{url}/?max_tokens=8")
            await page.wait_for_selector("#tiny", state="visible")
            await page.click("#start")
            done = "d => d.responses >= 1 && d.samplesPlayed > 0 && d.latencies.length >= 1"
            await page.wait_for_function(f"({done})(window.omnitalkDemo)", timeout=TURN_TIMEOUT_MS, polling=500)
            demo = await page.evaluate("window.omnitalkDemo")
            latency = await page.text_content("#latency")
            model = await page.text_content("#model")
            await page.screenshot(path=os.environ.get("OMNITALK_DEMO_SCREENSHOT", str(tmp_path / "demo.png")))
        finally:
            await context.close()
    assert errors == []
    assert model == "model: omnitalk-tiny-random"
    assert demo["speechDetected"] >= 1
    assert demo["responses"] >= 1
    assert demo["samplesPlayed"] > 0
    assert demo["latencies"][0] > 0
    assert f"{demo['latencies'][0]} ms" in latency
