"""The tiny and wide checkpoints: real HF layout, byte-reproducible, loadable by transformers, shaped for vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from omnitalk.engine.tiny.checkpoint import PARTS, SPEAKERS, make_tiny_checkpoint, tiny_checkpoint
from omnitalk.engine.tiny.config import TINY_CONFIG, WIDE_CONFIG

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


@pytest.fixture(scope="module")
def wide_dir() -> Path:
    """The cached wide checkpoint (1.2 GB; its first build takes about a minute on 2 cores)."""
    return tiny_checkpoint(size="wide")


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


def test_wide_cli_build_is_byte_identical_to_the_cached_build(wide_dir: Path, tmp_path: Path):
    out = tmp_path / "wide"
    omnitalk = Path(sys.executable).with_name("omnitalk")
    subprocess.run([omnitalk, "make-tiny", "--size", "wide", str(out)], check=True, capture_output=True)
    fresh, cached = files(out), files(wide_dir)
    assert fresh.keys() == cached.keys() == EXPECTED_FILES
    assert [name for name in fresh if fresh[name] != cached[name]] == []


def test_wide_differs_from_tiny_only_in_the_thinker_width_and_what_must_follow_it():
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
        return out

    tiny, wide = flat(TINY_CONFIG), flat(WIDE_CONFIG)
    assert tiny.keys() == wide.keys()
    assert {k for k in tiny if tiny[k] != wide[k]} == {
        "thinker_config.text_config.hidden_size",
        "thinker_config.text_config.intermediate_size",
        "thinker_config.text_config.num_hidden_layers",
        "thinker_config.text_config.num_attention_heads",
        "thinker_config.text_config.rope_parameters.mrope_section",
        "thinker_config.audio_config.output_dim",
        "thinker_config.vision_config.out_hidden_size",
        "talker_config.embedding_size",
    }


def test_wide_shapes_fit_vllm_cpu_and_transformers_loads_every_weight(wide_dir: Path):
    from transformers import AutoConfig, Qwen2_5OmniForConditionalGeneration
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(wide_dir)
    text = config.thinker_config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (768, 12)
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim in CPUAttentionBackend.get_supported_head_sizes()
    assert 2 * sum(text.rope_parameters["mrope_section"]) == head_dim
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(wide_dir)
    loaded = model.state_dict()
    index = json.loads((wide_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(loaded)
    assert loaded["thinker.model.embed_tokens.weight"].shape == (152064, 768)
    assert loaded["talker.thinker_to_talker_proj.weight"].shape == (64, 768)
    assert loaded["thinker.audio_tower.proj.weight"].shape[0] == 768
