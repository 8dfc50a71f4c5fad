"""Writes a tiny (or wide) random-weight Qwen2.5-Omni checkpoint in the real Hugging Face layout, reproducibly."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from omnitalk.engine.tiny.config import SIZES
from omnitalk.engine.tiny.tokenizer import build_tokenizer

# Bump whenever the bytes written change, so cached copies of older builds are not reused.
TINY_VERSION = 2
SEED = 20250326
PARTS = ("thinker", "talker", "token2wav")
# Real speaker entries of Qwen2.5-Omni's spk_dict.pt: bos ids are real, cond and ref_mel random.
SPEAKERS = {"Chelsie": 151872, "Ethan": 151870}
REF_MEL_FRAMES = 300  # 3 s of 100 Hz mel, like a short reference utterance
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
THINKER_EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
VOCODER_GAIN = 0.6  # of a variance-preserving draw: at 0.5 the vocoder is near silent, at 0.7 it clips
TARGET_RMS = 0.1  # -20 dBFS


def default_cache_dir() -> Path:
    if root := os.environ.get("OMNITALK_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omnitalk"


def tiny_checkpoint(cache_dir: Path | None = None, size: str = "tiny") -> Path:
    """The cached checkpoint of `size` (a key of SIZES), built on first use (safe against concurrent builders)."""
    target = (cache_dir or default_cache_dir()) / f"{size}-qwen2.5-omni-v{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        make_tiny_checkpoint(staging, size)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def make_tiny_checkpoint(out_dir: Path, size: str = "tiny") -> Path:
    """Writes config, weights (one shard per part), speakers, generation config, processor and tokenizer;
    `size` is a key of SIZES."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    if size not in SIZES:
        raise ValueError(f"unknown checkpoint size {size!r}: expected one of {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = Qwen2_5OmniConfig(**SIZES[size])
    config.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2_5OmniForConditionalGeneration(config).eval()
        _make_vocoder_audible(model.token2wav.code2wav_bigvgan_model, config.token2wav_config.bigvgan_config.mel_dim)
        speakers = _random_speakers(config.token2wav_config.dit_config)
    config.save_pretrained(out_dir)
    _write_generation_config(out_dir)
    _write_weights(model.state_dict(), out_dir)
    _save_torch_deterministic(speakers, out_dir / "spk_dict.pt")
    _build_processor().save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def _make_vocoder_audible(vocoder: torch.nn.Module, mel_dim: int) -> None:
    """Redraws the vocoder's conv weights so that random mels come out as clearly audible noise.

    transformers draws every weight with std 0.02, which the vocoder's stacked convolutions shrink to about 1e-8
    of full scale: silence. A fixed fraction of a variance-preserving draw keeps the signal alive through the stack;
    the output conv is then scaled so that a random log-mel comes out at TARGET_RMS, well inside the clamp."""
    for module in vocoder.modules():
        if isinstance(module, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
            fan_in = module.weight[0].numel() if isinstance(module, torch.nn.Conv1d) else module.weight[:, 0].numel()
            module.weight.normal_(0.0, VOCODER_GAIN * (2.0 / fan_in) ** 0.5)
    outputs: list[torch.Tensor] = []
    hook = vocoder.conv_post.register_forward_hook(lambda _module, _inputs, out: outputs.append(out))
    vocoder(torch.randn(1, mel_dim, 200))
    hook.remove()
    vocoder.conv_post.weight.mul_(TARGET_RMS / outputs[0].pow(2).mean().sqrt())


def _random_speakers(dit_config) -> dict[str, dict]:
    return {
        name: {
            "cond": torch.randn(1, dit_config.enc_emb_dim),
            "ref_mel": torch.randn(1, REF_MEL_FRAMES, dit_config.mel_dim),
            "bos_token": bos,
        }
        for name, bos in SPEAKERS.items()
    }


def _write_weights(state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Shards named like the real checkpoint's, one per part, plus the index that maps each tensor."""
    weight_map = {}
    total_size = 0
    for number, part in enumerate(PARTS, start=1):
        shard = f"model-{number:05d}-of-{len(PARTS):05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in state_dict.items() if k.split(".", 1)[0] == part}
        save_file(tensors, out_dir / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(weight_map) == len(state_dict), "a tensor belongs to no part"
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_generation_config(out_dir: Path) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=151643, eos_token_id=THINKER_EOS_IDS, pad_token_id=151643).save_pretrained(out_dir)


def _save_torch_deterministic(obj: object, path: Path) -> None:
    """torch.save, minus the random serialization id and timestamps that make two saves differ."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    archive = path.stem
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            name = archive + "/" + info.filename.split("/", 1)[1]
            if name.endswith("/.data/serialization_id"):
                data = b"0" * len(data)
            dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def _build_processor():
    """The real Qwen2.5-Omni preprocessing settings: 128-mel Whisper features, 14 px patches, 2x2 merge."""
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    vision = {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    tokenizer = build_tokenizer()
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}, **vision
        ),
        video_processor=Qwen2VLVideoProcessor(**vision),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=128,
            sampling_rate=16000,
            hop_length=160,
            chunk_length=300,
            n_fft=400,
            return_attention_mask=True,
        ),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
