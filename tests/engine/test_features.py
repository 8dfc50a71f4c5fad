"""Block-wise Whisper features against the processor's own feature extractor (no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from thinker_cases import tone
from transformers import WhisperFeatureExtractor

from omnitalk.engine.thinker.features import (
    BLOCK_FRAMES,
    BLOCK_SAMPLES,
    LOOKAHEAD,
    BlockFeatures,
    clip_features,
    clip_log_mel,
    split_blocks,
)
from omnitalk.engine.thinker.prompt import audio_feature_kwargs, audio_token_count


@pytest.fixture(scope="module")
def extractor(tiny_dir) -> WhisperFeatureExtractor:
    config = json.loads((tiny_dir / "processor_config.json").read_text())["feature_extractor"]
    return WhisperFeatureExtractor(**config)


def processor_features(extractor: WhisperFeatureExtractor, samples: np.ndarray):
    kwargs = audio_feature_kwargs([samples])["audio_kwargs"]
    out = extractor(samples, sampling_rate=16000, return_attention_mask=True, return_tensors="pt", **kwargs)
    return out["input_features"][0, :, : int(out["attention_mask"].sum())]


def pushed(samples: np.ndarray) -> BlockFeatures:
    blocks = BlockFeatures(128)
    for start in range(0, len(samples), 1600):
        blocks.append(samples[start : start + 1600])
    return blocks


@pytest.mark.parametrize("seconds", [0.5, 2.0, 4.3, 6.01])
def test_clip_and_block_features_equal_the_processors(extractor, seconds):
    samples = tone(seconds, seed=4)
    expected = processor_features(extractor, samples)
    whole = clip_features(samples, 128)
    assert whole.shape == expected.shape and whole.eq(expected).all()
    blocks = pushed(samples)
    assert blocks.num_blocks == max(0, (len(samples) - LOOKAHEAD) // BLOCK_SAMPLES)
    maximum = clip_log_mel(samples, 128)[1]
    assert not blocks.changed(blocks.num_blocks, blocks.peak, maximum)
    for k in range(blocks.num_blocks):
        assert blocks.block(k).equal(expected[:, k * BLOCK_FRAMES : (k + 1) * BLOCK_FRAMES])


def test_a_louder_later_block_that_moves_the_clamp_is_detected_exactly(extractor):
    """`changed` says a block differs exactly when its features clamped at the two maxima differ."""
    quiet = np.concatenate([np.zeros(8000, np.float32), 1e-4 * tone(2.0, seed=1)])  # digital silence: clamped
    samples = np.concatenate([quiet, tone(2.5, seed=2)])
    blocks = BlockFeatures(128)
    blocks.append(samples[: BLOCK_SAMPLES + LOOKAHEAD])
    first_peak, first = blocks.peak, blocks.block(0)
    assert blocks.append(samples[BLOCK_SAMPLES + LOOKAHEAD :]) == 1 and blocks.peak > first_peak
    assert blocks.changed(1, first_peak, blocks.peak) and not blocks.block(0).equal(first)
    assert not blocks.changed(0, first_peak, blocks.peak)  # nothing sent, nothing changes
    whole = clip_features(samples, 128)
    assert whole.equal(processor_features(extractor, samples))
    assert blocks.block(0).equal(whole[:, :BLOCK_FRAMES])  # re-clamped at the new maximum: the clip's own


def test_changed_is_exactly_whether_the_features_differ():
    """Over blocks of noise floors and gains where a second block sometimes moves the first's clamp and sometimes
    does not: `changed` holds exactly when the first block's features clamped at the two maxima differ."""
    outcomes = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        first = 0.1 * tone(2.0, seed=seed) + rng.normal(0, 10 ** rng.uniform(-4, -1), 32000).astype(np.float32)
        samples = np.concatenate([first, rng.uniform(0.1, 3) * tone(2.5, seed=seed + 100)]).astype(np.float32)
        blocks = BlockFeatures(128)
        blocks.append(samples[: BLOCK_SAMPLES + LOOKAHEAD])
        first_peak, before = blocks.peak, blocks.block(0)
        blocks.append(samples[BLOCK_SAMPLES + LOOKAHEAD :])
        changed = blocks.changed(1, first_peak, blocks.peak)
        assert changed == (not blocks.block(0).equal(before))
        outcomes.add(changed)
    assert outcomes == {True, False}


@pytest.mark.parametrize("seconds", [1.0, 2.0, 2.01, 2.03, 7.3])
def test_split_blocks_cuts_one_item_per_block_and_one_for_the_rest(seconds):
    samples = tone(seconds, seed=3)
    features = clip_features(samples, 128)
    items = split_blocks(features)
    assert all(item.is_contiguous() and item.dtype == torch.float32 for item in items)
    assert all(item.shape[1] == BLOCK_FRAMES for item in items[: features.shape[1] // BLOCK_FRAMES])
    tokens = sum(audio_token_count(item.shape[1] * 160) for item in items)
    assert tokens == audio_token_count(len(samples))  # the whole clip's tokens, none lost at a cut
    kept = sum(item.shape[1] for item in items)
    assert torch.cat(items, dim=1).equal(features[:, :kept])
    again = split_blocks(clip_features(samples.copy(), 128))
    assert all(a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(items, again, strict=True))
