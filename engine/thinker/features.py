"""Whisper log-mel features of a growing 16 kHz clip, one 2 s block (200 frames) at a time.

The thinker's audio encoder attends within 200-frame blocks, so a block's encoding depends only on its own
features. Those are a pure function of local samples except for one global term: Whisper clamps every log-mel
value from below at the clip's maximum minus 8. A block computed before the clip ends uses the running maximum;
`matches` tells, once the whole clip is known, whether that gave exactly the clip's own features (it does
unless a later block raised the maximum while the block held values under the clamp).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from omnitalk.engine.thinker.prompt import N_FFT, audio_token_count

HOP = 160  # samples per frame
BLOCK_FRAMES = 200  # the audio encoder's attention block: 2 * n_window
BLOCK_SAMPLES = BLOCK_FRAMES * HOP  # 2 s at 16 kHz
# A frame's STFT window reaches N_FFT // 2 samples to each side of its centre (frame j is centred on j * HOP);
# the last frame of a block reaches this far past the block's end.
LOOKAHEAD = (BLOCK_FRAMES - 1) * HOP + N_FFT // 2 - BLOCK_SAMPLES
CLAMP_DECADES = 8.0  # Whisper's dynamic range below the clip's maximum


@lru_cache(maxsize=4)
def _mel_filters(num_mels: int) -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=num_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(filters).to(torch.float32)


def _log_mel(padded: torch.Tensor, num_mels: int) -> torch.Tensor:
    """log10 mel power [num_mels, frames] of frames centred every HOP samples from N_FFT // 2 of `padded`,
    without the clamp; the frame whose window would pass the end is dropped, as Whisper drops it."""
    window = torch.hann_window(N_FFT)
    stft = torch.stft(padded, N_FFT, HOP, window=window, center=False, return_complex=True)
    power = (stft.abs() ** 2).contiguous()
    return torch.clamp(_mel_filters(num_mels).T @ power, min=1e-10).log10()


def _finish(log_spec: torch.Tensor, maximum: float) -> torch.Tensor:
    return (torch.maximum(log_spec, torch.tensor(maximum - CLAMP_DECADES)) + 4.0) / 4.0


def num_frames(num_samples: int) -> int:
    """Valid feature frames of a clip (the processor's attention mask)."""
    return -(-num_samples // HOP)


def clip_features(samples: np.ndarray, num_mels: int) -> torch.Tensor:
    """The features [num_mels, num_frames] the processor computes for a whole clip padded by half an STFT
    window (`prompt.audio_feature_kwargs`): zeros after the clip, then reflection at both ends."""
    wave = torch.from_numpy(np.concatenate([samples, np.zeros(N_FFT // 2, np.float32)]))
    padded = torch.nn.functional.pad(wave[None, None], (N_FFT // 2, N_FFT // 2), mode="reflect")[0, 0]
    log_spec = _log_mel(padded, num_mels)[:, :-1]
    return _finish(log_spec, float(log_spec.max()))[:, : num_frames(len(samples))]


def split_blocks(features: torch.Tensor) -> list[torch.Tensor]:
    """An utterance's features [num_mels, frames] as the audio items it is sent as: one contiguous float32
    [num_mels, BLOCK_FRAMES] per complete block, then the rest if it makes at least one audio token (a rest
    too short for one adds nothing to the prompt, as it adds nothing to the whole clip's tokens)."""
    features = features.to(torch.float32)
    complete = features.shape[1] // BLOCK_FRAMES
    items = [features[:, k * BLOCK_FRAMES : (k + 1) * BLOCK_FRAMES].contiguous() for k in range(complete)]
    rest = features[:, complete * BLOCK_FRAMES :]
    if audio_token_count(rest.shape[1] * HOP) > 0:
        items.append(rest.contiguous())
    return items


class BlockFeatures:
    """Features of complete blocks of a clip that is still arriving."""

    def __init__(self, num_mels: int) -> None:
        self._num_mels = num_mels
        self._samples = np.zeros(0, np.float32)
        self._blocks: list[torch.Tensor] = []
        self._maxima: list[float] = []  # the running maximum each block was clamped with
        self._maximum = -float("inf")

    @property
    def samples(self) -> np.ndarray:
        return self._samples

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def append(self, samples: np.ndarray) -> list[torch.Tensor]:
        """Adds samples; returns the features [num_mels, BLOCK_FRAMES] of every block completed by them. A
        block is complete once the samples its last frame's window reaches past its end have arrived."""
        self._samples = np.concatenate([self._samples, samples.astype(np.float32, copy=False)])
        done = []
        while len(self._samples) >= (len(self._blocks) + 1) * BLOCK_SAMPLES + LOOKAHEAD:
            done.append(self._next_block())
        return done

    def _next_block(self) -> torch.Tensor:
        start = len(self._blocks) * BLOCK_SAMPLES
        end = start + BLOCK_SAMPLES + N_FFT // 2
        if start == 0:  # the clip's own reflection padding in front of frame 0
            head = self._samples[1 : N_FFT // 2 + 1][::-1]
            piece = np.concatenate([head, self._samples[:end]])
        else:
            piece = self._samples[start - N_FFT // 2 : end]
        log_spec = _log_mel(torch.from_numpy(np.ascontiguousarray(piece)), self._num_mels)[:, :BLOCK_FRAMES]
        self._maximum = max(self._maximum, float(log_spec.max()))
        block = _finish(log_spec, self._maximum)
        self._blocks.append(block)
        self._maxima.append(self._maximum)
        return block

    def matches(self, features: torch.Tensor, atol: float = 1e-5) -> bool:
        """Whether the blocks handed out equal the whole clip's features (`clip_features` of all samples)."""
        return all(
            torch.allclose(block, features[:, k * BLOCK_FRAMES : (k + 1) * BLOCK_FRAMES], rtol=0.0, atol=atol)
            for k, block in enumerate(self._blocks)
        )
