"""`omnitalk serve`'s flags: one per ServerSettings field, vLLM's names for engine arguments, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from omnitalk.server.app import engine_config
from omnitalk.server.cli import build_parser, main, serve_settings
from omnitalk.server.settings import VLLM_FIELDS, ServerSettings


def settings_from(*flags: str) -> ServerSettings:
    argv = ["serve", *flags]
    return serve_settings(build_parser(argv).parse_args(argv))


def test_help_lists_every_setting_in_groups(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for name in ServerSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in text
        assert f"OMNITALK_{name.upper()}" in text
    for group in ("server:", "speech stage", "thinker: vLLM engine arguments"):
        assert group in text
    assert "-tp" in text  # vLLM's own aliases come with its definitions


def test_flags_land_in_the_engine_config(tiny_dir):
    settings = settings_from(
        "--model", str(tiny_dir), "--dtype", "bfloat16", "--gpu-memory-utilization", "0.5", "-tp", "2",
        "--max-num-batched-tokens", "2k", "--enforce-eager", "--enable-prefix-caching", "--kv-cache-dtype", "fp8",
        "--speech-device", "cpu", "--speech-dtype", "bfloat16", "--max-num-seqs", "4", "--code2wav-workers", "2",
        "--speech-threads", "3",
    )  # fmt: skip
    config = engine_config(settings)
    assert (config.thinker.dtype, config.thinker.gpu_memory_utilization) == ("bfloat16", 0.5)
    # vLLM's own parser read "2k" (k = 1000): the flag is its definition, not a copy
    assert (config.thinker.tensor_parallel_size, config.thinker.max_num_batched_tokens) == (2, 2000)
    assert config.thinker.enforce_eager and config.thinker.enable_prefix_caching
    assert (config.thinker.kv_cache_dtype, config.thinker.max_num_seqs) == ("fp8", 4)
    assert (config.speech.torch_device(), config.speech.torch_dtype()) == (torch.device("cpu"), torch.bfloat16)
    assert config.speech.num_code2wav_workers() == 2 and config.speech.num_threads() == 3


def test_session_state_and_prefix_caching_are_on_unless_turned_off():
    """State reuse across Realtime turns needs vLLM's prefix cache: both on by default, each with its off switch."""
    default = engine_config(settings_from())
    assert settings_from().session_state and default.thinker.enable_prefix_caching
    off = settings_from("--no-session-state", "--no-enable-prefix-caching")
    assert not off.session_state and not engine_config(off).thinker.enable_prefix_caching


def test_unset_flags_leave_the_environment_and_defaults(monkeypatch):
    monkeypatch.setenv("OMNITALK_MAX_NUM_SEQS", "3")
    settings = settings_from("--port", "9000")
    assert (settings.port, settings.max_num_seqs, settings.dtype) == (9000, 3, "auto")
    assert all(name in ServerSettings.model_fields for name in VLLM_FIELDS)


def refusal(capsys, *flags: str) -> str:
    """The one line `omnitalk serve` exits with (in-process: main(argv)), after checking it exits non-zero."""
    with pytest.raises(SystemExit) as exit:
        main(["serve", *flags])
    code = exit.value.code
    if isinstance(code, str):  # start-up checks: Python prints the message and exits with status 1
        message = code
    else:  # argparse: status 2, the line on stderr
        assert code == 2
        message = capsys.readouterr().err.strip()
    assert message.startswith("omnitalk") and "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
        (("--port", "eighty"), "argument --port: invalid int value"),
        (("--dtype", "int3"), "argument --dtype: invalid choice"),
        (("--speech-dtype", "float8"), "speech dtype 'float8'"),
        (("--speech-device", "tpu:0"), "speech device 'tpu:0'"),
        (("--code2wav-workers", "-1"), "code2wav_workers must not be negative"),
        (("--speech-threads", "0"), "speech threads must be at least 1"),
        (("--model", "/nonexistent"), "not a Hugging Face checkpoint directory"),
    ],
)
def test_bad_flags_exit_non_zero_with_one_line(capsys, flags, words):
    assert words in refusal(capsys, *flags)


def test_model_runner_v2_is_refused_before_anything_starts(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert "V1 runner" in refusal(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_command_refuses_a_cuda_speech_device_without_cuda():
    run = subprocess.run(
        [sys.executable, "-c", "from omnitalk.server.cli import main; main()", "serve", "--speech-device", "cuda:0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if line.startswith("omnitalk serve")]
    assert ours == ["omnitalk serve: error: speech device 'cuda:0' needs CUDA, and this machine has none"], run.stderr
    assert "Traceback" not in run.stderr
