"""The talker network: a Qwen2 decoder with TMRoPE, attending over a KV pool in fixed-size blocks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from omnitalk.engine.talker.config import TalkerConfig

TEXT_EMBED_KEY = "thinker.model.embed_tokens.weight"


@dataclass(slots=True)
class Context:
    """Where one forward writes and reads the KV pool; shared by every layer. The new keys and values are
    written to the pool first.

    Prefill (`valid` given) without a cached prefix (`block_tables` None): each row's keys are its own new
    tokens, right-padded; the causal mask keeps padding (always last) out of every real query. Otherwise (a
    prefill with a cached prefix in the batch, or a decode step, T = 1) each row reads its blocks from the pool
    (a cached prefix's blocks may be shared with other rows), masked by `mask`.
    """

    write: torch.Tensor  # [N] pool token indexes (block * block_size + offset) of the new real tokens
    valid: torch.Tensor | None = None  # prefill: [N] indexes into the flattened [B * T] of the real tokens
    block_tables: torch.Tensor | None = None  # [B, blocks] (padding points at any block: masked)
    mask: torch.Tensor | None = None  # [B, 1, T, blocks * block_size]: which keys each query sees


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, c: TalkerConfig) -> None:
        super().__init__()
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, ctx: Context
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2) for proj in self.qkv)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        pool_k, pool_v = kv[0], kv[1]  # [blocks, block_size, kv_heads, head_dim]
        flat_k, flat_v = pool_k.flatten(0, 1), pool_v.flatten(0, 1)
        if ctx.valid is not None:
            new_k, new_v = (t.transpose(1, 2).flatten(0, 1)[ctx.valid] for t in (k, v))
        else:
            new_k, new_v = k[:, :, 0], v[:, :, 0]
        flat_k.index_copy_(0, ctx.write, new_k)
        flat_v.index_copy_(0, ctx.write, new_v)
        if ctx.block_tables is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim**-0.5, enable_gqa=True)
        else:
            # One index_select per pool (a plain row copy; advanced indexing took 4x as long on the CPU).
            tables = ctx.block_tables.flatten()
            keys, values = (
                p.index_select(0, tables).view(batch, -1, *p.shape[2:]).transpose(1, 2) for p in (pool_k, pool_v)
            )
            if length > 1:
                # A prefill over cached blocks: with a mask, only the math kernel takes grouped heads, and it holds
                # every score ([B, heads, T, keys] in fp32); with the heads repeated, the memory-efficient one can.
                keys, values = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (keys, values))
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=ctx.mask, scale=self.head_dim**-0.5, enable_gqa=length == 1
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    @property
    def qkv(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj


class MLP(nn.Module):
    def __init__(self, c: TalkerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TalkerConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, ctx: Context
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c: TalkerConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.embedding_size)  # codec embeddings, in the thinker's width
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TalkerModel(nn.Module):
    """Parameter names are the checkpoint's `talker.*` names, plus `text_embed`: the thinker's token table."""

    def __init__(self, c: TalkerConfig, text_vocab_size: int) -> None:
        super().__init__()
        self.config = c
        self.text_embed = nn.Embedding(text_vocab_size, c.embedding_size)
        self.thinker_to_talker_proj = nn.Linear(c.embedding_size, c.hidden_size)
        self.model = Decoder(c)
        self.codec_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float, device="cpu") / c.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype, device: torch.device | str) -> TalkerModel:
        path = Path(path)
        state = {
            ("text_embed.weight" if key == TEXT_EMBED_KEY else key.removeprefix("talker.")): tensor.to(dtype)
            for key, tensor in _load_tensors(path).items()
        }
        with torch.device("meta"):
            model = cls(TalkerConfig.from_checkpoint(path), state["text_embed.weight"].shape[0])
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval()

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, pool: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Last-layer states [B, T, hidden] of input embeddings [B, T, E] at TMRoPE positions [3, B, T]."""
        x = self.thinker_to_talker_proj(embeds)
        cos, sin = self._rope(positions, x.dtype)
        for layer, kv in zip(self.model.layers, pool, strict=True):
            x = layer(x, cos, sin, kv, ctx)
        return self.model.norm(x)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, head_dim]: frequency bands taken from the t, h and w positions in turn."""
        freqs = positions[..., None].float() * self.inv_freq  # [3, B, T, head_dim / 2]
        bands = freqs.split(list(self.config.mrope_section), dim=-1)
        freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The `talker.*` tensors and the thinker's token table, read from only the shards that hold them."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(path / "model.safetensors", "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    wanted = [key for key in weight_map if key.startswith("talker.") or key == TEXT_EMBED_KEY]
    if TEXT_EMBED_KEY not in wanted:
        raise ValueError(f"{path} has no {TEXT_EMBED_KEY}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted({weight_map[key] for key in wanted}):
        with safe_open(path / shard, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in wanted if weight_map[key] == shard})
    return tensors
