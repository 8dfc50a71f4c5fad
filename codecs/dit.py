"""Code2Wav's flow-matching DiT: codec codes + speaker -> mel velocity, with block-local attention and CFG."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnitalk.codecs.ecapa import ECAPA


@dataclass(slots=True)
class DiTInputs:
    """Everything but x_t and t, built once per ODE solve. Rows: conditional streams, then unconditional."""

    context: torch.Tensor  # [2B, P, hidden]: the input projection of all but x_t (speaker, codes, x-vector), bias in
    masks: list[torch.Tensor]  # per layer, bool [2B or 1, heads * P / block, block, keys]: True where seen
    cos: torch.Tensor  # [P, head_dim] RoPE of positions 0..P-1 (window-relative)
    sin: torch.Tensor
    # P: the window's L frames right-padded to whole blocks; `keys` = the layer's neighbour blocks x block


@dataclass(slots=True)
class Modulation:
    """The time conditioning of every DiT evaluation of one ODE solve (it depends on t alone, and the times
    are fixed): row s of each tensor is the s-th evaluation time's."""

    blocks: list[torch.Tensor]  # per block [S, 6, hidden]: attention shift, 1 + scale, gate; the same for the MLP
    out: torch.Tensor  # [S, 2, hidden]: the output norm's 1 + scale, shift


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        angles = 1000 * t.reshape(-1, 1) * freqs.unsqueeze(0)
        # the angles (up to 1000 rad) in fp32 whatever the weights' dtype: bf16 would garble the phase
        return self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.time_mlp[0].weight.dtype))


class CodecEmbedding(nn.Module):
    def __init__(self, num_embeds: int, dim: int) -> None:
        super().__init__()
        self.codec_embed = nn.Embedding(num_embeds + 1, dim)


class InputEmbedding(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        width = cfg["mel_dim"] + cfg["enc_dim"] + cfg["enc_emb_dim"] + cfg["emb_dim"]
        self.proj = nn.Linear(width, cfg["hidden_size"])
        self.spk_encoder = ECAPA(cfg)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, reach: tuple[int, int]
    ) -> torch.Tensor:
        """x [B, P, dim] in blocks of `mask`'s size; `reach`: (blocks back, blocks ahead) each block sees."""
        batch, frames, _ = x.shape
        block = mask.shape[2]
        blocks = frames // block
        q, k, v = (
            p(x).view(batch, frames, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.to_q, self.to_k, self.to_v)
        )
        # The checkpoint was trained with interleaved RoPE on head 0 only. Rotating the de-interleaved
        # head gives the same q.k (both sides are permuted alike), as transformers does.
        q = torch.cat([_rope(q[:, :1], cos, sin), q[:, 1:]], dim=1)
        k = torch.cat([_rope(k[:, :1], cos, sin), k[:, 1:]], dim=1)
        # Block-local attention computed block by block: each query block is a "head" of its own that sees
        # only its neighbour blocks, not the whole window (what the mask hides is never multiplied).
        q = q.unflatten(2, (blocks, block)).flatten(1, 2)
        keys, values = (_neighbours(t.unflatten(2, (blocks, block)), *reach).flatten(1, 2) for t in (k, v))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, heads * blocks, block, d]
        return self.to_out[0](out.view(batch, self.heads, frames, -1).transpose(1, 2).reshape(batch, frames, -1))


def _neighbours(blocks: torch.Tensor, back: int, ahead: int) -> torch.Tensor:
    """[B, H, n, block, d] -> [B, H, n, (back + 1 + ahead) * block, d]: blocks i - back .. i + ahead for each
    block i, zeros past either end (the mask hides them)."""
    if back == ahead == 0:
        return blocks
    padded = F.pad(blocks, (0, 0, 0, 0, back, ahead))
    n = blocks.shape[2]
    return torch.cat([padded[:, :, j : j + n] for j in range(back + 1 + ahead)], dim=3)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class AdaNorm(nn.Module):
    """LayerNorm without affine whose shift/scale (and gates) come from the time embedding."""

    def __init__(self, dim: int, chunks: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.chunks, self.scales = chunks, scales
        self.linear = nn.Linear(dim, dim * chunks)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        """[S, chunks, dim] for the time embeddings [S, dim], 1 already added to the scale chunks."""
        out = self.linear(F.silu(t_emb)).unflatten(1, (self.chunks, -1))
        out[:, list(self.scales)] += 1
        return out


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.ff = nn.Sequential(
            nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh"), nn.Identity(), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: dict[str, Any], look_back: int, look_ahead: int) -> None:
        super().__init__()
        dim = cfg["hidden_size"]
        self.look_back, self.look_ahead = look_back, look_ahead
        self.attn_norm = AdaNorm(dim, 6, scales=(1, 4))
        self.attn = Attention(dim, cfg["num_attention_heads"], cfg["head_dim"])
        self.ff = FeedForward(dim, cfg["ff_mult"])

    def forward(self, x: torch.Tensor, mod: torch.Tensor, inputs: DiTInputs, mask: torch.Tensor) -> torch.Tensor:
        """`mod` [6, hidden]: this evaluation time's row of `Modulation.blocks`."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        reach = (self.look_back, self.look_ahead)
        attn = self.attn(_layer_norm(x, scale_msa, shift_msa), inputs.cos, inputs.sin, mask, reach)
        x = torch.addcmul(x, gate_msa, attn)
        return torch.addcmul(x, gate_mlp, self.ff(_layer_norm(x, scale_mlp, shift_mlp)))


def _layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * scale + shift with scale and shift [hidden], shared by every row (one t per call)."""
    return F.layer_norm(x, x.shape[-1:], scale, shift, eps=1e-6)


class DiT(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.block_size, self.repeats, self.num_embeds = cfg["block_size"], cfg["repeats"], cfg["num_embeds"]
        self.mel_dim = cfg["mel_dim"]
        self.time_embed = TimestepEmbedding(cfg["hidden_size"])
        self.text_embed = CodecEmbedding(cfg["num_embeds"], cfg["emb_dim"])
        self.input_embed = InputEmbedding(cfg)
        back, ahead = set(cfg["look_backward_layers"]), set(cfg["look_ahead_layers"])
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(cfg, int(i in back), int(i in ahead)) for i in range(cfg["num_hidden_layers"])
        )
        self.norm_out = AdaNorm(cfg["hidden_size"], 2, scales=(0,))
        self.proj_out = nn.Linear(cfg["hidden_size"], cfg["mel_dim"])
        head_dim, theta = cfg["head_dim"], cfg["rope_parameters"]["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def speaker_vector(self, ref_mel: torch.Tensor) -> torch.Tensor:
        """ECAPA embedding of a reference mel [B, T, 80] -> [B, enc_dim] (cache it per speaker)."""
        return self.input_embed.spk_encoder(ref_mel)

    def prepare(
        self,
        codes: torch.Tensor,
        spk: torch.Tensor,
        cond: torch.Tensor,
        lengths: list[int],
        uncond_spk: torch.Tensor | None,
        per_row_masks: bool = False,
    ) -> DiTInputs:
        """codes [B, L / repeats] (padded), spk [B, enc_dim], cond [B, enc_emb_dim], lengths: valid mel frames.

        With `uncond_spk` (ECAPA of a zero ref mel) the rows are doubled for classifier-free guidance:
        the unconditional half has code 0, zero x-vector and that speaker vector. `per_row_masks` gives every
        row its own mask even when no row is padded (a static shape for CUDA graphs).
        """
        # The table has num_embeds + 1 rows. Like Qwen's fork, codes beyond it (talker specials) become 0;
        # transformers does not clamp and would index out of range.
        codes = torch.where(codes > self.num_embeds, torch.zeros_like(codes), codes)
        if uncond_spk is not None:
            codes = torch.cat([codes, torch.zeros_like(codes)])
            spk = torch.cat([spk, uncond_spk])
            cond = torch.cat([cond, torch.zeros_like(cond)])
        code_emb = self.text_embed.codec_embed(codes).repeat_interleave(self.repeats, dim=1)
        frames = code_emb.shape[1]
        context = torch.cat(
            [spk.unsqueeze(1).expand(-1, frames, -1), code_emb, cond.unsqueeze(1).expand(-1, frames, -1)], dim=-1
        )
        proj = self.input_embed.proj
        context = F.linear(context, proj.weight[:, self.mel_dim :], proj.bias)  # x_t's columns come first
        padded = -(-frames // self.block_size) * self.block_size  # whole blocks; the frames past L are masked
        context = F.pad(context, (0, 0, 0, padded - frames))
        positions = torch.arange(padded, device=codes.device, dtype=torch.float)
        angles = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        rows = lengths * 2 if uncond_spk is not None else lengths
        if not per_row_masks and len(set(rows)) == 1:
            rows = rows[:1]  # one mask row serves every row
        masks = self._masks(padded, rows, codes.device)
        per_layer = [masks[b.look_back, b.look_ahead] for b in self.transformer_blocks]
        return DiTInputs(context, per_layer, angles.cos().to(context.dtype), angles.sin().to(context.dtype))

    def modulation(self, times: torch.Tensor) -> Modulation:
        """The time conditioning at the evaluation times [S] of a solve, all at once."""
        t_emb = self.time_embed(times)
        return Modulation([block.attn_norm(t_emb) for block in self.transformer_blocks], self.norm_out(t_emb))

    def _masks(self, frames: int, lengths: list[int], device: torch.device) -> dict[tuple[int, int], torch.Tensor]:
        """Per (blocks back, blocks ahead) of the layers, the mask [len(lengths), heads * blocks, block, keys] of
        `frames` (whole blocks): a query sees the keys of its neighbour blocks that lie inside its row's valid
        length, and itself. Padding queries see only themselves, so no softmax row is empty (NaN would
        leak into valid rows through 0 * NaN)."""
        block = self.block_size
        blocks = frames // block
        query = torch.arange(frames, device=device).view(blocks, block, 1)
        length = torch.tensor(lengths, device=device).view(-1, 1, 1, 1)
        masks = {}
        for b in self.transformer_blocks:
            reach = (b.look_back, b.look_ahead)
            if reach not in masks:
                first = torch.arange(blocks, device=device)[:, None] - b.look_back  # each block's first neighbour
                neighbour = first + torch.arange(sum(reach) + 1, device=device)[None, :]
                key = (neighbour[:, :, None] * block + torch.arange(block, device=device)).view(blocks, 1, -1)
                seen = ((key >= 0) & (key < length)) | (key == query)  # [rows, blocks, block, keys]
                heads = b.attn.heads
                masks[reach] = seen.unsqueeze(1).expand(-1, heads, -1, -1, -1).flatten(1, 2).contiguous()
        return masks

    def forward(self, x: torch.Tensor, stage: int, inputs: DiTInputs, modulation: Modulation) -> torch.Tensor:
        """x [B, L, mel] at the `stage`-th time of `modulation` -> predicted velocity [R, L, mel] for the R rows
        of `inputs` (B, or 2B with guidance: both halves see the same x, so it is projected once)."""
        proj, frames = self.input_embed.proj, x.shape[1]
        x = F.pad(x, (0, 0, 0, inputs.context.shape[1] - frames))
        h = inputs.context.unflatten(0, (-1, x.shape[0])) + F.linear(x, proj.weight[:, : self.mel_dim])
        h = h.flatten(0, 1)
        for block, mod, mask in zip(self.transformer_blocks, modulation.blocks, inputs.masks, strict=True):
            h = block(h, mod[stage], inputs, mask)
        scale, shift = modulation.out[stage]
        return self.proj_out(_layer_norm(h[:, :frames], scale, shift))

    def velocity(
        self, x: torch.Tensor, stage: int, inputs: DiTInputs, modulation: Modulation, guidance_scale: float
    ) -> torch.Tensor:
        """The guided velocity v = c + g (c - u) for the ODE state x [B, L, mel], in fp32 whatever the weights'
        dtype: the state and the guidance difference keep fp32, only the network runs in the weights' dtype."""
        out = self(x.to(inputs.context.dtype), stage, inputs, modulation).float()
        if out.shape[0] == x.shape[0]:
            return out
        cond, null = torch.chunk(out, 2, dim=0)
        return cond + (cond - null) * guidance_scale
