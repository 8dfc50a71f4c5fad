"""Code2Wav one-shot against transformers' token2wav (tiny checkpoint, identical noise)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from oracle import Reference

from omnitalk.codecs.code2wav import Code2Wav
from omnitalk.codecs.streaming import StreamingConfig

PARITY_TOL = 1e-4  # max abs diff, relative to the largest value compared


@pytest.fixture(scope="module")
def code2wav(tiny_dir: Path) -> Code2Wav:
    return Code2Wav.from_checkpoint(tiny_dir)


def random_codes(n: int, seed: int) -> list[int]:
    return torch.randint(0, 8192, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Relative to the largest value compared, so that the bound means the same at any output level."""
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= PARITY_TOL * expected.abs().max()


@pytest.mark.parametrize(("speaker", "n"), [("Chelsie", 37), ("Ethan", 100)])
def test_one_shot_matches_transformers(reference: Reference, code2wav: Code2Wav, speaker: str, n: int) -> None:
    codes = random_codes(n, seed=n)
    expected = reference.code2wav(codes, speaker=speaker, noise=torch.Generator().manual_seed(n))
    mel, wav = code2wav.one_shot(codes, speaker, noise=expected.noise)
    assert mel.shape == (2 * n, 80) and wav.shape == (n * 480,)
    assert (mel - expected.mel).abs().max() < PARITY_TOL
    # The tiny DiT's mel is mostly its noise: hold the part the DiT adds to the same bound too.
    assert_close(mel - expected.noise[0], expected.mel - expected.noise[0])
    assert_close(wav, expected.waveform)


def hf_euler_mel(reference: Reference, codes: list[int], speaker: str, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler (torchdiffeq's fixed grid) on transformers' DiT forward, with sample()'s grid and guidance."""
    dit = reference.model.token2wav.code2wav_dit_model
    params = reference.model.speaker_map[speaker]
    frames = noise.shape[1]
    cond = params["cond"].float().unsqueeze(1).repeat(1, frames, 1)
    code = torch.tensor([codes])
    times = torch.linspace(0, 1, steps)
    times = times - (torch.cos(math.pi / 2 * times) - 1 + times)
    x = noise.clone()
    with torch.no_grad():
        for t0, t1 in itertools.pairwise(times):
            out = dit(x, params["ref_mel"].float(), cond, code, t0, apply_cfg=True)
            guided, null = torch.chunk(out, 2, dim=0)
            x = x + (t1 - t0) * (guided + (guided - null) * 0.5)
    return x[0]


@pytest.mark.parametrize("steps", [10, 4])
def test_euler_matches_transformers_dit_and_differs_from_rk4(
    reference: Reference, code2wav: Code2Wav, steps: int
) -> None:
    codes = random_codes(40, seed=steps)
    noise = torch.randn(1, 80, 80, generator=torch.Generator().manual_seed(steps))
    mel, wav = code2wav.one_shot(codes, "Chelsie", noise=noise, solver="euler", num_steps=steps)
    expected = hf_euler_mel(reference, codes, "Chelsie", noise, steps)
    assert_close(mel - noise[0], expected - noise[0])
    assert torch.isfinite(wav).all()
    rk4, _ = code2wav.one_shot(codes, "Chelsie", noise=noise, num_steps=steps)
    assert (mel - rk4).abs().max() > 1e-3
    configured, _ = code2wav.with_config(StreamingConfig(solver="euler", num_steps=steps)).one_shot(
        codes, "Chelsie", noise=noise
    )
    assert torch.equal(configured, mel)
    with pytest.raises(ValueError, match="solver"):
        code2wav.one_shot(codes, "Chelsie", solver="midpoint")


@pytest.mark.parametrize("n", [30, 157])
def test_solver_choice_changes_dit_calls_and_keeps_length(code2wav: Code2Wav, n: int) -> None:
    """Counted DiT forward passes, not time: RK4 evaluates 4 times per interval, Euler once."""
    calls = []
    hook = code2wav.dit.register_forward_hook(lambda *_: calls.append(1))
    codes, results = random_codes(n, seed=n), {}
    try:
        for solver in ("rk4", "euler"):
            model = code2wav.with_config(StreamingConfig(solver=solver))
            calls.clear()
            before = model.dit_calls
            stream = model.new_stream("Ethan", seed=1)
            stream.push(codes)
            stream.finish()
            audio = [model.decode([stream])[0] for _ in range(8) if model.ready(stream)]
            results[solver] = (len(calls), model.dit_calls - before, sum(len(a) for a in audio), len(audio))
    finally:
        hook.remove()
    chunks = results["rk4"][3]
    assert results["rk4"] == (36 * chunks, 36 * chunks, n * 480, chunks)
    assert results["euler"] == (9 * chunks, 9 * chunks, n * 480, chunks)


def test_codes_beyond_the_table_become_code_zero(code2wav: Code2Wav) -> None:
    """Qwen's fork zeroes codes >= the DiT table (8448 rows in the tiny checkpoint, 8194 in the real one)."""
    codes = random_codes(30, seed=3)
    table = code2wav.dit.text_embed.codec_embed.num_embeddings
    wild = [table, table + 5, 151860, *codes[3:]]
    mel, wav = code2wav.one_shot(wild, "Ethan", seed=1)
    mel0, wav0 = code2wav.one_shot([0, 0, 0, *codes[3:]], "Ethan", seed=1)
    assert torch.equal(mel, mel0) and torch.equal(wav, wav0)
    last, _ = code2wav.one_shot([table - 1, *codes[1:]], "Ethan", seed=1)
    assert not torch.equal(last, code2wav.one_shot([0, *codes[1:]], "Ethan", seed=1)[0])


def test_unknown_speaker_is_a_value_error(code2wav: Code2Wav) -> None:
    with pytest.raises(ValueError, match="unknown speaker"):
        code2wav.new_stream("Nobody", seed=0)
    with pytest.raises(ValueError, match="unknown speaker"):
        code2wav.one_shot([1, 2, 3], "Nobody")
    assert set(code2wav.speakers) == {"Chelsie", "Ethan"}


def test_one_shot_seed_is_reproducible_and_empty_codes_give_no_audio(code2wav: Code2Wav) -> None:
    codes = random_codes(12, seed=5)
    first, second, other = (code2wav.one_shot(codes, "Chelsie", seed=s)[1] for s in (4, 4, 5))
    assert torch.equal(first, second) and not torch.equal(first, other)
    mel, wav = code2wav.one_shot([], "Chelsie")
    assert mel.shape == (0, 80) and wav.shape == (0,)


@pytest.mark.parametrize("speaker", ["Chelsie", "Ethan"])
def test_the_tiny_models_speech_is_audible_noise(code2wav: Code2Wav, speaker: str) -> None:
    wav = code2wav.one_shot(random_codes(50, seed=11), speaker)[1].double()
    rms_dbfs = 10 * math.log10(wav.pow(2).mean().item())
    assert -30 < rms_dbfs < -6, f"{rms_dbfs:.1f} dBFS"
    assert (wav.abs() >= 1).double().mean() < 0.01  # not clipped into a square wave
