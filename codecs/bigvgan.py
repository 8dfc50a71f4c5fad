"""BigVGAN vocoder of Code2Wav: log-mel [B, T, 80] -> 24 kHz waveform [B, T * 240] in [-1, 1]."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """A Kaiser-windowed sinc low-pass filter [1, 1, kernel_size] summing to 1 (as in BigVGAN)."""
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False, dtype=torch.float32)
    times = torch.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * times)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class SnakeBeta(nn.Module):
    """x + sin^2(alpha x) / beta, with log-scale per-channel alpha and beta."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.exp(self.alpha)[None, :, None]
        beta = torch.exp(self.beta)[None, :, None]
        return torch.addcmul(x, 1.0 / (beta + 1e-9), torch.sin(x * alpha).square())  # 4 passes over x, not 5


TAPS = 12  # the length of BigVGAN's Kaiser-sinc filters, up and down
BAND_BLOCK = 16  # output samples per row of a banded filter product


class AntiAliasedSnake(nn.Module):
    """SnakeBeta at twice the sample rate: 2x sinc upsample, activation, 2x sinc downsample (12 taps each).

    Each resampling filter is one FIR shared by every channel, so it runs as one matrix product: the signal is
    cut into blocks of inputs (overlapping by the filter's reach), and a banded matrix maps each block to
    `BAND_BLOCK` outputs. That gives what the grouped (depthwise) convolutions of BigVGAN give, up to rounding,
    and on the CPU it is 2 to 5 times faster at every stage's shape.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act = SnakeBeta(channels)
        taps = kaiser_sinc_filter(0.25, 0.3, TAPS).flatten()
        self.register_buffer("up_band", _upsample_band(taps, BAND_BLOCK), persistent=False)
        self.register_buffer("down_band", _downsample_band(taps, BAND_BLOCK), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[-1]
        up = self.act(_banded(x, self.up_band, BAND_BLOCK, reach=UP_REACH, length=2 * frames))
        return _banded(up, self.down_band, 2 * BAND_BLOCK, reach=DOWN_REACH, length=frames)


# BigVGAN's 2x upsample: replicate-pad the input by 5, transposed conv (stride 2) with 2 * taps, crop 15 a side.
# Output m of it is 2 * sum_n x[n - 5] taps[m + 15 - 2n], so the block of outputs [2bS, 2bS + 2S) reads the
# inputs bS - 3 .. bS + S + 2 (edge values past either end).
UP_REACH = 3
# The 2x downsample: replicate-pad by (5, 6), conv stride 2. Output j is sum_k taps[k] x[2j + k - 5], so the
# block [bS, bS + S) reads the inputs 2bS - 5 .. 2bS + 2S + 4.
DOWN_REACH = 5


def _upsample_band(taps: torch.Tensor, block: int) -> torch.Tensor:
    """[block + 2 * UP_REACH, 2 * block]: row i is input bS - 3 + i, column r output 2bS + r."""
    i = torch.arange(block + 2 * UP_REACH)[:, None]
    k = torch.arange(2 * block)[None, :] + 15 - 2 * (i + 5 - UP_REACH)
    return torch.where((k >= 0) & (k < TAPS), 2 * taps[k.clamp(0, TAPS - 1)], 0.0)


def _downsample_band(taps: torch.Tensor, block: int) -> torch.Tensor:
    """[2 * block + 2 * DOWN_REACH, block]: row i is input 2bS - 5 + i, column r output bS + r."""
    k = torch.arange(2 * block + 2 * DOWN_REACH)[:, None] - 2 * torch.arange(block)[None, :]
    return torch.where((k >= 0) & (k < TAPS), taps[k.clamp(0, TAPS - 1)], 0.0)


def _banded(x: torch.Tensor, band: torch.Tensor, step: int, reach: int, length: int) -> torch.Tensor:
    """The first `length` outputs of the FIR `band` over x [B, C, T]: blocks of `step` inputs (plus `reach`
    a side, edge values past either end) -> `band.shape[1]` outputs each."""
    width, per_block = band.shape
    blocks = -(-length // per_block)
    zeros = (blocks - 1) * step + width - (x.shape[-1] + 2 * reach)  # what the last block reads past the edge
    edges = [x[..., :1].expand(*x.shape[:-1], reach), x, x[..., -1:].expand(*x.shape[:-1], reach)]
    if zeros > 0:
        edges.append(x.new_zeros(*x.shape[:-1], zeros))  # feeds only outputs past `length`
    rows = torch.cat(edges, dim=-1).unfold(-1, width, step).reshape(-1, width)
    return (rows @ band).view(*x.shape[:-1], -1)[..., :length]


class AMPBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: list[int]) -> None:
        super().__init__()

        def conv(dilation: int) -> nn.Conv1d:
            return nn.Conv1d(
                channels, channels, kernel_size, dilation=dilation, padding=(kernel_size - 1) * dilation // 2
            )

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations = nn.ModuleList(AntiAliasedSnake(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.activations
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, acts[::2], acts[1::2], strict=True):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class BigVGAN(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        width = cfg["upsample_initial_channel"]
        kernels, dilations = cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]
        self.num_kernels = len(kernels)
        self.conv_pre = nn.Conv1d(cfg["mel_dim"], width, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (stride, kernel) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"], strict=True)):
            channels = width // 2 ** (i + 1)
            up = nn.ConvTranspose1d(width // 2**i, channels, kernel, stride, padding=(kernel - stride) // 2)
            self.ups.append(nn.ModuleList([up]))
            self.resblocks.extend(AMPBlock(channels, k, d) for k, d in zip(kernels, dilations, strict=True))
        self.activation_post = AntiAliasedSnake(channels)
        self.conv_post = nn.Conv1d(channels, 1, 7, padding=3, bias=False)
        self.hop = math.prod(cfg["upsample_rates"])

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, T, mel_dim] (natural-log amplitude) -> fp32 waveform [B, T * hop] in any weight dtype."""
        # exp / log10 of the mel in fp32: in bf16 the dB scale would be off by up to a few dB
        x = self.conv_pre(_normalize(mel.float().transpose(1, 2)).to(self.conv_pre.weight.dtype))
        for i, (up,) in enumerate(self.ups):
            x = up(x)
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        return torch.clamp(x.float(), -1.0, 1.0).squeeze(1)


def _normalize(mel: torch.Tensor, min_db: float = -115.0) -> torch.Tensor:
    """log amplitude -> dB floored at min_db, minus 20 dB -> [-1, 1]."""
    floor = math.exp(min_db / 20.0 * math.log(10))  # a Python scalar: no host-to-device copy in a CUDA graph
    db = 20 * torch.log10(torch.clamp(torch.exp(mel), min=floor)) - 20
    return torch.clamp(2 * ((db - min_db) / (-min_db)) - 1, -1.0, 1.0)
