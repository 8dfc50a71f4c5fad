"""Block-wise Whisper features against the processor's own feature extractor (no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from thinker_cases import tone
from transformers import WhisperFeatureExtractor

from omnitalk.engine.thinker.features import BLOCK_FRAMES, BLOCK_SAMPLES, LOOKAHEAD, BlockFeatures, clip_features
from omnitalk.engine.thinker.prompt import audio_feature_kwargs


@pytest.fixture(scope="module")
def extractor(tiny_dir) -> WhisperFeatureExtractor:
    config = json.loads((tiny_dir / "processor_config.json").read_text())["feature_extractor"]
    return WhisperFeatureExtractor(**config)


def processor_features(extractor: WhisperFeatureExtractor, samples: np.ndarray):
    kwargs = audio_feature_kwargs([samples])["audio_kwargs"]
    out = extractor(samples, sampling_rate=16000, return_attention_mask=True, return_tensors="pt", **kwargs)
    return out["input_features"][0, :, : int(out["attention_mask"].sum())]


@pytest.mark.parametrize("seconds", [0.5, 2.0, 4.3, 6.01])
def test_clip_and_block_features_equal_the_processors(extractor, seconds):
    samples = tone(seconds, seed=4)
    expected = processor_features(extractor, samples)
    whole = clip_features(samples, 128)
    assert whole.shape == expected.shape and whole.eq(expected).all()
    blocks = BlockFeatures(128)
    handed_out = [f for start in range(0, len(samples), 1600) for f in blocks.append(samples[start : start + 1600])]
    assert len(handed_out) == max(0, (len(samples) - LOOKAHEAD) // BLOCK_SAMPLES)
    for k, block in enumerate(handed_out):
        assert block.equal(expected[:, k * BLOCK_FRAMES : (k + 1) * BLOCK_FRAMES])
    assert blocks.matches(whole)


def test_a_louder_later_block_that_moves_the_clamp_is_detected(extractor):
    quiet = np.concatenate([np.zeros(8000, np.float32), 1e-4 * tone(2.0, seed=1)])  # digital silence: clamped
    loud = tone(2.5, seed=2)
    samples = np.concatenate([quiet, loud])
    blocks = BlockFeatures(128)
    blocks.append(samples)
    assert blocks.num_blocks == 2
    assert not blocks.matches(clip_features(samples, 128))
    assert clip_features(samples, 128).equal(processor_features(extractor, samples))
