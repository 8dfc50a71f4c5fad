"""The session row store's pure parts: content keys, how much of a request they cover, the block rendering."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from thinker_cases import tone

from omnitalk.engine.thinker.conversation import (
    AUDIO_PLACEHOLDER,
    ClipItems,
    Recorder,
    SessionRows,
    SessionStates,
    content_keys,
    extend_keys,
    features_audio,
    session_prompt,
)
from omnitalk.engine.thinker.events import HiddenStates, ThinkerText
from omnitalk.engine.thinker.features import BLOCK_FRAMES, HOP, clip_features, split_blocks
from omnitalk.engine.thinker.prompt import audio_token_count

NUM_MELS = 128


@dataclass
class _Range:
    offset: int
    length: int


@dataclass
class _Feature:  # the two fields of vLLM's MultiModalFeatureSpec the keys read
    identifier: str
    mm_position: _Range


def test_keys_are_equal_exactly_as_far_as_the_prefixes_are():
    a = content_keys([1, 2, 3, 4, 5])
    assert content_keys([1, 2, 3, 9, 5])[:3] == a[:3]
    assert content_keys([1, 2, 3, 9, 5])[3:] != a[3:]  # the chain: a change reaches every later key
    assert SessionRows(a, torch.zeros(5, 2)).covered(content_keys([1, 2, 3, 9, 5])) == 3
    assert SessionRows(a, torch.zeros(5, 2)).covered(content_keys([1, 2, 3, 4, 5, 6, 7])) == 5
    assert SessionRows(a, torch.zeros(5, 2)).covered(content_keys([7])) == 0
    assert SessionRows(a[:2], torch.zeros(2, 2)).covered(a) == 2


def test_the_same_tokens_over_other_media_differ_from_the_media_on():
    ids = [10, 77, 77, 77, 11]
    one = content_keys(ids, [_Feature("clip-a", _Range(1, 3))])
    other = content_keys(ids, [_Feature("clip-b", _Range(1, 3))])
    assert one[0] == other[0] and one[1] != other[1]
    split = content_keys(ids, [_Feature("clip-a", _Range(1, 2)), _Feature("clip-c", _Range(3, 1))])
    assert SessionRows(one, torch.zeros(5, 1)).covered(split) == 3


def test_an_answer_continues_its_prompts_keys():
    prompt = content_keys([1, 2, 3])
    assert extend_keys(prompt, [4, 5]) == content_keys([1, 2, 3, 4, 5])


def test_the_recorder_keeps_every_position_with_a_row():
    recorder = Recorder(keys=content_keys([1, 2, 3]))
    recorder.add(HiddenStates(0, torch.arange(6.0).reshape(3, 2)))
    recorder.add(ThinkerText([4], "a"))
    recorder.add(HiddenStates(3, torch.tensor([[6.0, 7.0]])))
    recorder.add(ThinkerText([5], "b"))  # the last token: never fed back, no row
    sessions = SessionStates(max_rows=10, num_mels=NUM_MELS)
    recorder.store(sessions, "s")
    stored = sessions.get("s")
    assert stored.keys == content_keys([1, 2, 3, 4]) and torch.equal(stored.rows, torch.arange(8.0).reshape(4, 2))
    assert sessions.num_bytes == 8 * 4
    sessions.forget("s")
    assert sessions.get("s") is None


def test_a_request_longer_than_the_bound_is_not_kept():
    sessions = SessionStates(max_rows=2, num_mels=NUM_MELS)
    sessions.put("s", content_keys([1, 2, 3]), torch.zeros(3, 1))
    assert sessions.get("s") is None


def test_blocks_cover_the_clip_and_its_tokens():
    for seconds in (0.3, 2.0, 5.37, 6.0025):
        samples = tone(seconds, seed=2)
        features = clip_features(samples, NUM_MELS)
        items = split_blocks(features)
        assert all(item.is_contiguous() and item.dtype == torch.float32 for item in items)
        assert all(item.shape[1] == BLOCK_FRAMES for item in items[:-1])
        assert sum(audio_token_count(item.shape[1] * HOP) for item in items) == audio_token_count(len(samples))
        kept = sum(item.shape[1] for item in items)
        assert torch.equal(torch.cat(items, dim=1), features[:, :kept])


def test_an_items_data_does_not_depend_on_the_others():
    block = clip_features(tone(2.0), NUM_MELS)
    rest = clip_features(tone(0.5), NUM_MELS)
    alone, beside = features_audio([block]), features_audio([rest, block])
    assert torch.equal(alone["feature_attention_mask"][0], beside["feature_attention_mask"][1])
    assert beside["audio_feature_lengths"].tolist() == [rest.shape[1], BLOCK_FRAMES]
    assert torch.equal(beside["input_audio_features"][:, rest.shape[1] :], block)


def test_a_session_prompt_sends_each_clip_as_its_blocks():
    clips = [tone(5.37, seed=1), tone(1.0, seed=2)]
    text = f"a<|audio_bos|>{AUDIO_PLACEHOLDER}<|audio_eos|>b<|audio_bos|>{AUDIO_PLACEHOLDER}<|audio_eos|>"
    prompt = {"prompt": text, "multi_modal_data": {"audio": [(c, 16000) for c in clips]},
              "mm_processor_kwargs": {"use_audio_in_video": False, "audio_kwargs": {"max_length": 1}}}  # fmt: skip
    clip_items = ClipItems(NUM_MELS)
    result = session_prompt(prompt, clip_items, audio_token=999)
    assert result["prompt"].count(AUDIO_PLACEHOLDER) == 3 + 1
    assert result["prompt"].startswith(f"a<|audio_bos|>{AUDIO_PLACEHOLDER * 3}<|audio_eos|>b")
    assert result["mm_processor_kwargs"] == {"use_audio_in_video": False}
    assert result["multi_modal_data"]["audio"]["audio_feature_lengths"].tolist() == [200, 200, 137, 100]
    ids = {"prompt_token_ids": [5, 999, 6, 999], "multi_modal_data": prompt["multi_modal_data"]}
    assert session_prompt(ids, clip_items, audio_token=999)["prompt_token_ids"] == [5, 999, 999, 999, 6, 999]
    assert clip_items(clips[0]) is clip_items(clips[0])  # computed once per clip
    assert torch.equal(torch.cat(clip_items(clips[0].copy()), dim=1), clip_features(clips[0], NUM_MELS))
    assert np.array_equal(prompt["multi_modal_data"]["audio"][0][0], clips[0])  # the input is left alone
    with_image = {**prompt, "multi_modal_data": {**prompt["multi_modal_data"], "image": ["a picture"]}}
    assert session_prompt(with_image, clip_items, audio_token=999) is with_image
