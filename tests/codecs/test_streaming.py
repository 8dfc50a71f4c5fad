"""Streaming Code2Wav: Qwen's fork chunking on transformers, one-shot agreement, joins, batching, push patterns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import Reference

from omnitalk.codecs.code2wav import Code2Wav
from omnitalk.codecs.streaming import Code2WavStream, StreamingConfig

# Streamed vs one-shot at the same noise, tiny checkpoint (measured: 126 dB, 2.4e-7; docs/code2wav.md). The
# tiny random DiT couples neighbouring blocks so weakly that the windows' missing context barely shows;
# what these bounds hold is the bookkeeping (noise and code slices, block alignment, vocoder overlap).
STREAM_SNR_DB = 100.0
STREAM_MEL_TOL = 1e-5
CONFIGS = {
    "fork": StreamingConfig(),
    "first48": StreamingConfig(first_chunk_mel=48),
    "codes24": StreamingConfig.for_first_chunk(24),
    "codes12": StreamingConfig.for_first_chunk(12),
}


class CapturingCode2Wav(Code2Wav):
    """Keeps the mel each decode emits, per stream."""

    emitted: dict[int, list[torch.Tensor]]

    def _emit(self, active, mels, wavs):
        for (stream, _), mel in zip(active, mels, strict=True):
            self.emitted.setdefault(id(stream), []).append(mel)
        return super()._emit(active, mels, wavs)


@pytest.fixture(scope="module")
def models(tiny_dir: Path) -> dict[str, CapturingCode2Wav]:
    models = {name: CapturingCode2Wav.from_checkpoint(tiny_dir, config=config) for name, config in CONFIGS.items()}
    for model in models.values():
        model.emitted = {}
    return models


@pytest.fixture(autouse=True)
def fresh_captures(models: dict[str, CapturingCode2Wav]) -> Iterator[None]:
    """Stream ids are reused once a stream is freed: start every test with no captured mel."""
    for model in models.values():
        model.emitted.clear()
    yield


def random_codes(n: int, seed: int) -> list[int]:
    return torch.randint(0, 8192, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def stream_codes(model: Code2Wav, stream: Code2WavStream, codes: list[int], step: int = 1) -> list[np.ndarray]:
    """Pushes `step` codes at a time, decoding whenever ready, then finishes and drains."""
    chunks = []
    for i in range(0, len(codes), step):
        stream.push(codes[i : i + step])
        while model.ready(stream):
            chunks.append(model.decode([stream])[0])
    stream.finish()
    while model.ready(stream):
        chunks.append(model.decode([stream])[0])
    assert stream.done
    return chunks


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / max(np.sum((reference - test) ** 2), 1e-300)))


def fork_chunks(reference: Reference, codes: list[int], speaker: str, noise: torch.Tensor) -> list[torch.Tensor]:
    """Qwen's fork (Code2WavEngine.step_generate_waveform, process_chunk_for_50hz) on transformers' modules."""
    vocoder = reference.model.token2wav.code2wav_bigvgan_model
    chunk, past, future, overlap = 72, 48, 24, 20
    chunks, prev, progress = [], None, 0
    for n in range(1, len(codes) + 1):
        finished = n == len(codes)
        if not ((2 * n - future > 0 and (2 * n - future) % chunk == 0) or finished):
            continue
        if progress == 0 and finished:  # process_little_chunk: one-shot
            chunks.append(reference.code2wav(codes, speaker=speaker, noise=noise).waveform)
            break
        start, end = max(progress * chunk - past, 0), min((progress + 1) * chunk + future, 2 * n)
        mel = reference.code2wav(codes[start // 2 : end // 2], speaker=speaker, noise=noise[:, start:end]).mel
        generated = mel[:chunk] if start == 0 else mel[past:] if finished else mel[past:-future]
        with torch.no_grad():
            audio = vocoder(torch.cat([prev[-2 * overlap :], generated]).T[None] if start else generated.T[None])
        if progress == 0:
            audio = audio[: -overlap * 240]
        else:
            audio = audio[overlap * 240 :] if finished else audio[overlap * 240 : -overlap * 240]
        chunks.append(audio)
        prev, progress = generated, progress + 1
    return chunks


@pytest.mark.parametrize("n", [30, 130])
def test_streaming_equals_qwen_fork_chunking_on_transformers(
    reference: Reference, models: dict[str, CapturingCode2Wav], n: int
) -> None:
    model, codes = models["fork"], random_codes(n, seed=n)
    stream = model.new_stream("Ethan", seed=n)
    ours = stream_codes(model, stream, codes)
    expected = fork_chunks(reference, codes, "Ethan", stream.noise.take(0, 2 * n)[None])
    assert [len(c) for c in ours] == [len(c) for c in expected]
    for got, want in zip(ours, expected, strict=True):
        assert np.abs(got - want.numpy()).max() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_streaming_matches_one_shot(models: dict[str, CapturingCode2Wav], config: str) -> None:
    model, n = models[config], 157
    codes = random_codes(n, seed=11)
    mel, wav = model.one_shot(codes, "Chelsie", seed=3)
    stream = model.new_stream("Chelsie", seed=3)
    chunks = stream_codes(model, stream, codes)
    streamed = np.concatenate(chunks)
    assert streamed.dtype == np.float32 and len(streamed) == n * 480 == stream.samples_emitted
    assert snr_db(wav.numpy(), streamed) >= STREAM_SNR_DB
    assert (torch.cat(model.emitted[id(stream)]) - mel).abs().max() < STREAM_MEL_TOL
    assert_smooth_joins(streamed, np.cumsum([len(c) for c in chunks])[:-1])


def assert_smooth_joins(signal: np.ndarray, joins: np.ndarray) -> None:
    """No click where chunks meet: a chunk shifted by a sample or a missed overlap trim puts a step at the
    join that no sample-to-sample step of the continuous signal reaches (the signal's own largest step is
    the scale, so the check needs no absolute threshold)."""
    steps = np.abs(np.diff(signal))
    at_joins = steps[joins - 1]  # the step from the last sample of a chunk to the first of the next
    elsewhere = np.delete(steps, joins - 1)
    assert at_joins.max() <= elsewhere.max()


def test_chunk_sizes_and_triggers_follow_the_fork(models: dict[str, CapturingCode2Wav]) -> None:
    model = models["fork"]
    assert [model.config.codes_for_chunk(k) for k in range(4)] == [48, 84, 120, 156]
    stream = model.new_stream("Chelsie", seed=0)
    stream.push(random_codes(47, seed=1))
    assert not model.ready(stream)
    stream.push([5])
    assert model.ready(stream)
    stream.push(random_codes(40, seed=2))  # 88 codes: the first two chunks are ready
    sizes = [len(model.decode([stream])[0]) for _ in range(2)]
    assert sizes == [12480, 17280] and not model.ready(stream)
    stream.finish()
    assert len(model.decode([stream])[0]) == 88 * 480 - sum(sizes) and stream.done
    assert not model.ready(stream) and len(model.decode([stream])[0]) == 0


@pytest.mark.parametrize("n", [0, 1, 23, 24, 47, 48, 49, 84, 85])
def test_streamed_length_is_exactly_one_shot_length(models: dict[str, CapturingCode2Wav], n: int) -> None:
    for model in models.values():
        stream = model.new_stream("Ethan", seed=n)
        chunks = stream_codes(model, stream, random_codes(n, seed=n), step=7)
        assert sum(len(c) for c in chunks) == n * 480 == stream.samples_emitted


def test_finishing_before_the_first_chunk_is_one_shot(models: dict[str, CapturingCode2Wav]) -> None:
    model, codes = models["fork"], random_codes(40, seed=8)
    stream = model.new_stream("Chelsie", seed=9)
    (chunk,) = stream_codes(model, stream, codes)
    np.testing.assert_array_equal(chunk, model.one_shot(codes, "Chelsie", seed=9)[1].numpy())


def test_uneven_pushes_give_identical_audio(models: dict[str, CapturingCode2Wav]) -> None:
    model, codes = models["first48"], random_codes(130, seed=4)
    one_by_one = stream_codes(model, model.new_stream("Ethan", seed=5), codes, step=1)
    all_at_once = stream_codes(model, model.new_stream("Ethan", seed=5), codes, step=len(codes))
    uneven = model.new_stream("Ethan", seed=5)
    for size in [3, 17, 1, 40, 9, 33, 27]:
        uneven.push(codes[len(uneven.codes) : len(uneven.codes) + size])
        while model.ready(uneven):
            model.decode([uneven])
    assert len(uneven.codes) == len(codes)
    np.testing.assert_array_equal(np.concatenate(one_by_one), np.concatenate(all_at_once))
    assert [len(c) for c in one_by_one] == [len(c) for c in all_at_once]


def test_batched_decode_equals_unbatched(models: dict[str, CapturingCode2Wav]) -> None:
    model = models["fork"]
    specs = [("Chelsie", 1, 150), ("Ethan", 2, 60), ("Chelsie", 3, 40), ("Ethan", 4, 100), ("Chelsie", 5, 20)]

    def make_streams() -> list[Code2WavStream]:
        streams = []
        for speaker, seed, n in specs:
            stream = model.new_stream(speaker, seed=seed)
            stream.push(random_codes(n, seed=seed))
            if seed != 5:  # stream 5 stays open with too few codes: never ready, decodes to nothing
                stream.finish()
            streams.append(stream)
        model.decode([streams[3]])  # stream 4 starts a chunk ahead of the others
        return streams

    alone, batched = make_streams(), make_streams()
    out_alone: list[list[np.ndarray]] = [[] for _ in specs]
    out_batched: list[list[np.ndarray]] = [[] for _ in specs]
    while any(model.ready(s) for s in batched):
        for i, chunk in enumerate(model.decode(batched)):
            out_batched[i].append(chunk)
        for i, stream in enumerate(alone):
            out_alone[i].append(model.decode([stream])[0])
    for got, want, stream, single in zip(out_batched, out_alone, batched, alone, strict=True):
        assert [len(c) for c in got] == [len(c) for c in want]
        mels, single_mels = model.emitted.get(id(stream), []), model.emitted.get(id(single), [])
        for mel, single_mel in zip(mels, single_mels, strict=True):
            assert (mel - single_mel).abs().max() < 1e-5
        got, want = np.concatenate(got), np.concatenate(want)
        assert np.abs(got - want).max(initial=0) <= 1e-5 * np.abs(want).max(initial=0)
        assert stream.done or not stream.finished
    assert sum(len(c) for c in out_batched[4]) == 0 and not batched[4].done
    with pytest.raises(ValueError, match="twice"):
        model.decode([batched[0], batched[0]])


@pytest.mark.parametrize(("codes", "first_mel", "ahead"), [(48, 72, 24), (24, 24, 24), (12, 24, 0)])
def test_first_chunk_size_sets_the_first_trigger_in_whole_blocks(codes: int, first_mel: int, ahead: int) -> None:
    config = StreamingConfig.for_first_chunk(codes)
    assert (config.first_chunk_mel, config.future(0), config.future(1)) == (first_mel, ahead, 24)
    assert config.codes_for_chunk(0) == codes
    if codes == 48:
        assert config == StreamingConfig(first_future_mel=24)  # Qwen's fork windows
    for bad in (11, 30, 47):  # under one block, or not whole blocks plus look-ahead
        with pytest.raises(ValueError, match="first chunk"):
            StreamingConfig.for_first_chunk(bad)


def test_static_shapes_path_equals_eager(models: dict[str, CapturingCode2Wav]) -> None:
    """The padded fixed-buffer path that CUDA graphs replay, run eagerly: bucketed batches, same audio."""
    eager = models["codes24"]
    static = Code2Wav(eager.dit, eager.vocoder, eager.speakers, eager.config, static_shapes=True)
    assert not static.static.capture  # no CUDA here: the same calls, uncaptured
    outputs = []
    for model in (eager, static):
        streams = [model.new_stream("Ethan" if i % 2 else "Chelsie", seed=i) for i in range(3)]
        chunks: list[list[np.ndarray]] = [[] for _ in streams]
        for i, stream in enumerate(streams):
            stream.push(random_codes(100 + 20 * i, seed=i))
            stream.finish()
        while any(model.ready(s) for s in streams):
            for i, chunk in enumerate(model.decode(streams)):
                chunks[i].append(chunk)
        outputs.append([np.concatenate(c) for c in chunks])
    assert len(static.static) >= 3  # a DiT window shape and vocoder shapes went through fixed buffers
    for got, want in zip(*outputs, strict=True):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_bf16_keeps_the_ode_state_and_mel_in_fp32(tiny_dir: Path, models: dict[str, CapturingCode2Wav]) -> None:
    bf16 = Code2Wav.from_checkpoint(tiny_dir, dtype=torch.bfloat16, config=StreamingConfig.for_first_chunk(24))
    assert bf16.dtype == torch.bfloat16 and bf16.speakers["Chelsie"].spk.dtype == torch.bfloat16
    codes = random_codes(90, seed=6)
    mel, wav = bf16.one_shot(codes, "Chelsie", seed=2)
    ref_mel, ref_wav = models["codes24"].one_shot(codes, "Chelsie", seed=2)
    assert mel.dtype == wav.dtype == torch.float32 and wav.shape == ref_wav.shape
    # bf16 weights and activations, measured: mel within 2e-3 of fp32 where the DiT adds ~0.4 to the noise
    assert (mel - ref_mel).abs().max() < 2e-2
    stream = bf16.new_stream("Chelsie", seed=2)
    streamed = np.concatenate(stream_codes(bf16, stream, codes))
    assert streamed.dtype == np.float32 and len(streamed) == len(wav) and stream.mel_tail.dtype == torch.float32


def test_invalid_configs_and_pushes_are_rejected(tiny_dir: Path, models: dict[str, CapturingCode2Wav]) -> None:
    bads = ({"chunk_mel": 71}, {"solver": "midpoint"}, {"num_steps": 1}, {"first_chunk_mel": 20})
    for bad in (*bads, {"first_future_mel": 26}, {"first_future_mel": 3}):
        with pytest.raises(ValueError):
            StreamingConfig(**bad)
    with pytest.raises(ValueError, match="multiples of the block"):
        Code2Wav.from_checkpoint(tiny_dir, config=StreamingConfig(chunk_mel=60))
    stream = models["fork"].new_stream("Chelsie", seed=0)
    stream.finish()
    assert stream.done and not models["fork"].ready(stream)
    with pytest.raises(ValueError, match="after finish"):
        stream.push([1])
