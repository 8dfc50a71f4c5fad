"""The tiny checkpoint: real HF layout, byte-reproducible, loadable by transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from omnitalk.engine.tiny.checkpoint import PARTS, SPEAKERS, make_tiny_checkpoint

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
    "spk_dict.pt",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_layout(tiny_dir: Path):
    assert set(files(tiny_dir)) == EXPECTED_FILES


def test_cli_build_is_byte_identical_to_the_cached_build(tiny_dir: Path, tmp_path: Path):
    """Two builds (one through the CLI) give the same bytes; a mismatch may mean TINY_VERSION needs a bump."""
    out = tmp_path / "tiny"
    omnitalk = Path(sys.executable).with_name("omnitalk")  # the console script of this environment
    subprocess.run([omnitalk, "make-tiny", str(out)], check=True, capture_output=True)
    fresh, cached = files(out), files(tiny_dir)
    assert fresh.keys() == cached.keys()
    assert [name for name in fresh if fresh[name] != cached[name]] == []


def test_one_shard_per_part_and_the_index_covers_every_tensor(tiny_dir: Path):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    for number, part in enumerate(PARTS, start=1):
        shard = f"model-{number:05d}-of-00003.safetensors"
        with safe_open(tiny_dir / shard, "pt") as f:
            keys = set(f.keys())
        assert keys and all(k.startswith(part + ".") for k in keys)
        assert {k for k, v in index["weight_map"].items() if v == shard} == keys
    prefixes = {k.split(".")[1] for k in index["weight_map"] if k.startswith("thinker.")}
    assert {"audio_tower", "visual", "model", "lm_head"} <= prefixes


def test_config_keeps_real_ids_and_geometry_with_vllm_cpu_head_dims(tiny_dir: Path):
    config = json.loads((tiny_dir / "config.json").read_text())
    thinker, talker = config["thinker_config"], config["talker_config"]
    text = thinker["text_config"]
    assert text["vocab_size"] == 152064 and talker["vocab_size"] == 8448
    assert (thinker["audio_token_index"], thinker["image_token_index"], thinker["video_token_index"]) == (
        151646,
        151655,
        151656,
    )
    assert (talker["tts_codec_start_token_id"], talker["tts_codec_end_token_id"]) == (8293, 8294)
    assert text["hidden_size"] // text["num_attention_heads"] >= 32
    assert thinker["audio_config"]["num_mel_bins"] == 128 and thinker["audio_config"]["n_window"] == 100
    dit = config["token2wav_config"]["dit_config"]
    assert (dit["block_size"], dit["repeats"], dit["mel_dim"]) == (24, 2, 80)


def test_speakers(tiny_dir: Path):
    speakers = torch.load(tiny_dir / "spk_dict.pt", weights_only=True)
    assert {name: s["bos_token"] for name, s in speakers.items()} == SPEAKERS
    for s in speakers.values():
        assert s["cond"].shape == (1, 192) and s["ref_mel"].shape[0] == 1 and s["ref_mel"].shape[2] == 80


def test_transformers_loads_every_weight(tiny_dir: Path):
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_dir)
    loaded = model.state_dict()
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(loaded)
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(tiny_dir / shard, "pt") as f:
            assert all(torch.equal(f.get_tensor(k), loaded[k]) for k in f.keys())  # noqa: SIM118
    assert set(model.speaker_map) == set(SPEAKERS)
    processor = Qwen2_5OmniProcessor.from_pretrained(tiny_dir)
    assert processor.feature_extractor.feature_size == 128
    assert processor.image_processor.patch_size == 14


@pytest.mark.parametrize("bad", ["config.json", "model-00002-of-00003.safetensors"])
def test_make_tiny_overwrites_a_damaged_directory(tmp_path: Path, tiny_dir: Path, bad: str):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / bad).write_text("garbage")
    make_tiny_checkpoint(out)
    assert (out / bad).read_bytes() == (tiny_dir / bad).read_bytes()
