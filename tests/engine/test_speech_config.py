"""Where and in what dtype the speech stage runs: resolution, refusals, and a bf16 talker (the CUDA default)."""

from __future__ import annotations

import json
import queue

import pytest
import torch

from omnitalk.engine.speech.config import SpeechConfig
from omnitalk.engine.speech.engine import AudioChunk, SpeechDone, SpeechEngine
from omnitalk.engine.talker.sampling import TalkerSampling


def test_auto_follows_the_machine():
    config = SpeechConfig()
    if torch.cuda.is_available():
        assert (config.torch_device(), config.torch_dtype()) == (torch.device("cuda:0"), torch.bfloat16)
    else:
        assert (config.torch_device(), config.torch_dtype()) == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (lambda: SpeechConfig(dtype="int8"), "speech dtype 'int8'"),
        (lambda: SpeechConfig(device="gpu0").torch_device(), "not a device name"),
        (lambda: SpeechConfig(device="mps").torch_device(), "runs on cpu or cuda"),
        (lambda: SpeechConfig(device=f"cuda:{torch.cuda.device_count()}").torch_device(), "cuda"),
        (lambda: SpeechConfig(code2wav_workers=-1), "code2wav_workers"),
    ],
)
def test_devices_and_dtypes_this_machine_lacks_are_refused(config, words):
    with pytest.raises(ValueError, match=words):
        config()


def test_code2wav_workers_default_to_one_on_a_multi_core_cpu_and_none_on_a_gpu(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert SpeechConfig(device="cpu").num_code2wav_workers() == 1
    assert SpeechConfig(device="cpu", code2wav_workers=0).num_code2wav_workers() == 0
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert SpeechConfig(device="cpu").num_code2wav_workers() == 0
    if torch.cuda.is_available():
        assert SpeechConfig(device="cuda:0").num_code2wav_workers() == 0
        with pytest.raises(ValueError, match="on the CPU"):
            SpeechConfig(device="cuda:0", code2wav_workers=1).num_code2wav_workers()


def test_a_bf16_talker_speaks_float32_audio(tiny_dir):
    hidden = json.loads((tiny_dir / "config.json").read_text())["thinker_config"]["text_config"]["hidden_size"]
    engine = SpeechEngine.from_checkpoint(tiny_dir, SpeechConfig(device="cpu", dtype="bfloat16", max_streams=2))
    try:
        assert engine.talker.model.codec_head.weight.dtype == torch.bfloat16
        events: queue.SimpleQueue = queue.SimpleQueue()
        prompt, generated = list(range(10, 30)), [40, 41, 42, 43]
        engine.open("a", prompt, None, "Chelsie", TalkerSampling(max_tokens=60, seed=1), events.put)
        engine.add_rows("a", 0, torch.randn(len(prompt) + len(generated) - 1, hidden))
        engine.add_tokens("a", generated)
        engine.thinker_done("a")
        samples = 0
        while not isinstance(event := events.get(timeout=120), SpeechDone):
            assert isinstance(event, AudioChunk) and event.samples.dtype.name == "float32"
            samples += len(event.samples)
        assert event.num_codes == 60 and samples == 60 * 480
    finally:
        engine.shutdown()


def test_the_speech_stage_takes_one_torch_thread_beside_a_thinker_on_the_cpu(monkeypatch, tiny_dir):
    """vLLM's CPU worker binds every core but one; a second torch thread here would spin against it."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert SpeechConfig().num_threads() == 1 and SpeechConfig(threads=2).num_threads() == 2
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert SpeechConfig().num_threads() is None  # a thinker on a GPU leaves the cores to torch's default
    monkeypatch.undo()
    try:
        SpeechEngine.from_checkpoint(tiny_dir, SpeechConfig(device="cpu", threads=2, code2wav_workers=0)).shutdown()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # the test session's
