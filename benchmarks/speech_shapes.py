"""The speech stage's random-weight checkpoint at real or tiny shapes, and transformers' path over it.

transformers' Qwen2.5-Omni config classes default to the 7B's thinker, DiT and BigVGAN, but their talker
defaults are the thinker's widths (hidden 3584, 28 layers): the published 7B talker is hidden 896,
intermediate 18944, 24 layers, 12 heads (head_dim 128), 4 kv heads, embedding 3584, vocab 8448.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from omnitalk.engine.tiny.config import TINY_CONFIG

SEVEN_B_TALKER = {
    "hidden_size": 896, "intermediate_size": 18944, "num_hidden_layers": 24, "num_attention_heads": 12,
    "num_key_value_heads": 4, "head_dim": 128, "embedding_size": 3584, "vocab_size": 8448,
}  # fmt: skip
SPEAKER_BOS = 151872  # Chelsie's talker bos in the real spk_dict.pt
REF_MEL_FRAMES = 300


@dataclass(slots=True)
class Models:
    talker: Any  # transformers' Qwen2_5OmniTalkerForConditionalGeneration
    token2wav: Any  # transformers' Qwen2_5OmniToken2WavModel
    text_embed: torch.nn.Embedding
    speaker: dict[str, torch.Tensor]
    embedding_size: int


def build_checkpoint(out: Path, tiny: bool, device: str) -> tuple[Path, Models]:
    """Writes config.json, one safetensors file (talker, token2wav, the thinker's token table) and spk_dict.pt."""
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniTalkerForConditionalGeneration,
        Qwen2_5OmniToken2WavModel,
    )

    config = Qwen2_5OmniConfig(**TINY_CONFIG) if tiny else Qwen2_5OmniConfig(talker_config=SEVEN_B_TALKER)
    text = config.thinker_config.text_config
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not minutes, at 7B shapes
        talker = Qwen2_5OmniTalkerForConditionalGeneration(config.talker_config).eval()
        token2wav = Qwen2_5OmniToken2WavModel(config.token2wav_config).eval()
        text_embed = torch.nn.Embedding(text.vocab_size, text.hidden_size)
    dit = config.token2wav_config.dit_config
    speaker = {
        "cond": torch.randn(1, dit.enc_emb_dim),
        "ref_mel": torch.randn(1, REF_MEL_FRAMES, dit.mel_dim),
        "bos_token": SPEAKER_BOS,
    }
    tensors = {f"talker.{k}": v for k, v in talker.state_dict().items()}
    tensors |= {f"token2wav.{k}": v for k, v in token2wav.state_dict().items()}
    tensors["thinker.model.embed_tokens.weight"] = text_embed.weight.detach()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
    torch.save({"Chelsie": speaker}, out / "spk_dict.pt")
    return out, Models(talker, token2wav, text_embed, speaker, config.talker_config.embedding_size)


@torch.no_grad()
def transformers_one_stream(models: Models, args: argparse.Namespace) -> dict[str, Any]:
    """transformers' talker.generate then token2wav for one answer of args.codes codes (as generate() does)."""
    talker, device = models.talker.to(getattr(torch, args.dtype)), args.device
    dtype = next(talker.parameters()).dtype
    prompt, tokens = args.prompt, args.thinker_tokens
    hidden = torch.randn(1, prompt + tokens, models.embedding_size, device=device, dtype=dtype)
    ids = torch.randint(1000, 100_000, (1, prompt + tokens), device=device)
    embeds = hidden + models.text_embed(ids).to(dtype)
    bos = models.text_embed(torch.tensor([[SPEAKER_BOS]], device=device)).to(dtype)
    eos, pad = (models.text_embed(torch.tensor([[t]], device=device)).to(dtype) for t in (151861, 151859))
    inputs_embeds = torch.cat([embeds[:, :prompt], bos, embeds[:, prompt : prompt + 1]], dim=1)
    reply = torch.cat([embeds[:, prompt + 1 :], eos, pad], dim=1)
    codec = talker.config
    input_ids = torch.cat(
        [
            torch.full((1, prompt), codec.tts_codec_mask_token_id, device=device),
            torch.tensor([[codec.tts_codec_pad_token_id, codec.tts_codec_start_token_id]], device=device),
        ],
        dim=1,
    )
    text_ids = torch.cat([ids[:, :prompt], torch.tensor([[SPEAKER_BOS]], device=device), ids[:, prompt:][:, :1]], 1)
    _sync(device)
    start = time.perf_counter()
    result = talker.generate(
        input_ids=input_ids, input_text_ids=text_ids, thinker_reply_part=reply, inputs_embeds=inputs_embeds,
        attention_mask=torch.ones_like(input_ids), suppress_tokens=[codec.tts_codec_start_token_id],
        max_new_tokens=args.codes, min_new_tokens=args.codes, eos_token_id=[8292, 8294],
        do_sample=True, top_k=40, top_p=0.8, temperature=0.9, repetition_penalty=1.05,
    )  # fmt: skip
    codes = result[:, input_ids.shape[1] :]
    _sync(device)
    talker_s = time.perf_counter() - start
    token2wav = models.token2wav.float()  # generate() runs token2wav in fp32
    wav = token2wav(
        codes,
        conditioning=models.speaker["cond"].to(device),
        reference_mel=models.speaker["ref_mel"].to(device),
    )
    _sync(device)
    total = time.perf_counter() - start
    audio = wav.numel() / 24_000
    return {"codes": codes.shape[1], "audio_s": audio, "talker_s": talker_s, "token2wav_s": total - talker_s,
            "total_s": total, "first_audio_ms": 1000 * total, "rtf": total / audio}  # fmt: skip


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
