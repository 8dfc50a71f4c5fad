"""BigVGAN's anti-aliased activation: the banded matrix products against the grouped convolutions they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnitalk.codecs.bigvgan import TAPS, AntiAliasedSnake, kaiser_sinc_filter


def grouped_conv_reference(module: AntiAliasedSnake, x: torch.Tensor) -> torch.Tensor:
    """BigVGAN's own formulation: depthwise transposed conv up, activation, depthwise conv down."""
    channels = x.shape[1]
    weight = kaiser_sinc_filter(0.25, 0.3, TAPS).expand(channels, -1, -1)
    pad = TAPS // 2 - 1
    crop = pad * 2 + (TAPS - 2) // 2
    up = 2 * F.conv_transpose1d(F.pad(x, (pad, pad), mode="replicate"), weight, stride=2, groups=channels)
    up = module.act(up[..., crop : up.shape[-1] - crop])
    return F.conv1d(F.pad(up, (TAPS // 2 - 1, TAPS // 2), mode="replicate"), weight, stride=2, groups=channels)


@pytest.mark.parametrize(("batch", "channels", "frames"), [(1, 1, 1), (2, 3, 7), (3, 2, 16), (1, 4, 97), (2, 8, 560)])
def test_banded_resampling_equals_the_grouped_convolutions(batch: int, channels: int, frames: int) -> None:
    generator = torch.Generator().manual_seed(frames)
    module = AntiAliasedSnake(channels)
    with torch.no_grad():
        module.act.alpha.copy_(torch.randn(channels, generator=generator))
        module.act.beta.copy_(torch.randn(channels, generator=generator))
        x = torch.randn(batch, channels, frames, generator=generator)
        expected = grouped_conv_reference(module, x)
        actual = module(x)
    assert actual.shape == expected.shape == (batch, channels, frames)
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
