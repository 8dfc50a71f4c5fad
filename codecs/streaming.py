"""Streaming Code2Wav: window sizes, per-stream state and the plan of each stream's next audio chunk."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MEL_PER_CODE = 2  # DiT `repeats`: one 50 Hz code is two 100 Hz mel frames
HOP = 240  # samples per mel frame at 24 kHz
SAMPLES_PER_CODE = MEL_PER_CODE * HOP
NOISE_PAGE = 1024  # mel frames of noise drawn at a time (about 10 s of audio)
SOLVERS = ("rk4", "euler")
BLOCK_MEL = 24  # the DiT's block_size in every Qwen2.5-Omni checkpoint (checked at load)


@dataclass(frozen=True, slots=True)
class StreamingConfig:
    """Window sizes in mel frames (Qwen's fork by default) and the ODE settings, shared by every stream.

    Chunk k emits mel [b_k, b_k+1) with b_0 = 0, b_1 = first_chunk_mel, then steps of chunk_mel. Its DiT
    window adds past_mel frames before and future_mel after (chunk 0: first_future_mel, future_mel when None;
    clipped to the codes); the vocoder sees
    2 * overlap_mel frames of already emitted mel before the chunk, and the audio of the last overlap_mel
    frames of every chunk but the final one waits for the next chunk.
    """

    chunk_mel: int = 72
    first_chunk_mel: int = 72
    past_mel: int = 48
    future_mel: int = 24
    overlap_mel: int = 20
    first_future_mel: int | None = None
    solver: str = "rk4"
    num_steps: int = 10
    guidance_scale: float = 0.5
    sway_coefficient: float = -1.0

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, not {self.solver!r}")
        if self.num_steps < 2:
            raise ValueError("num_steps counts time points, including 0 and 1: at least 2")
        sizes = (self.chunk_mel, self.first_chunk_mel, self.past_mel, self.future_mel, self.overlap_mel)
        if any(size % MEL_PER_CODE for size in sizes):
            raise ValueError(f"window sizes must be whole codes ({MEL_PER_CODE} mel frames each)")
        if self.future_mel <= 0 or self.past_mel < 0 or self.overlap_mel < 0:
            raise ValueError("future_mel must be positive, past_mel and overlap_mel not negative")
        if not 0 <= self.future(0) <= self.future_mel or self.future(0) % MEL_PER_CODE:
            raise ValueError("first_future_mel must be whole codes between 0 and future_mel")
        if min(self.first_chunk_mel, self.chunk_mel) <= self.overlap_mel:
            raise ValueError("chunks must be longer than overlap_mel, or a chunk would emit nothing")

    @classmethod
    def for_first_chunk(cls, codes: int, **settings: object) -> StreamingConfig:
        """Windows whose first audio needs `codes` codes: the first chunk emits whole DiT blocks and keeps
        as much of the future_mel look-ahead as fits (48 codes: 72 + 24 frames; 24: 24 + 24; 12: 24 + 0)."""
        base = cls(**settings)  # type: ignore[arg-type]
        block = BLOCK_MEL
        frames = codes * MEL_PER_CODE
        ahead = min(base.future_mel, frames - block)
        if ahead < 0 or (frames - ahead) % block:
            raise ValueError(f"a first chunk of {codes} codes is not whole {block}-frame DiT blocks plus look-ahead")
        return cls(**{**settings, "first_chunk_mel": frames - ahead, "first_future_mel": ahead})  # type: ignore[arg-type]

    def future(self, k: int) -> int:
        """Look-ahead frames of chunk k's DiT window."""
        return self.future_mel if k or self.first_future_mel is None else self.first_future_mel

    def window_frames(self, k: int) -> int:
        """DiT window length of chunk k when it is not the final one (a static shape from k = 1 on)."""
        return self.boundary(k + 1) + self.future(k) - max(self.boundary(k) - self.past_mel, 0)

    def check_blocks(self, block_size: int) -> None:
        """Windows must start on DiT block boundaries, or their blocks would not line up with one-shot's."""
        if any(size % block_size for size in (self.chunk_mel, self.first_chunk_mel, self.past_mel)):
            raise ValueError(f"chunk_mel, first_chunk_mel and past_mel must be multiples of the block ({block_size})")

    def boundary(self, k: int) -> int:
        """b_k: the first mel frame of chunk k."""
        return 0 if k == 0 else self.first_chunk_mel + (k - 1) * self.chunk_mel

    def codes_for_chunk(self, k: int) -> int:
        """Codes a stream needs before chunk k can be decoded without finishing."""
        return (self.boundary(k + 1) + self.future(k)) // MEL_PER_CODE


class NoiseBuffer:
    """One stream's fixed DiT noise, drawn page by page from its seed: frames [a, b) never depend on b."""

    def __init__(self, seed: int, mel_dim: int = 80) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.mel_dim = mel_dim
        self.frames = torch.empty(0, mel_dim)

    def take(self, start: int, end: int) -> torch.Tensor:
        """Noise frames [start, end) as [end - start, mel_dim] (CPU float32)."""
        while self.frames.shape[0] < end:
            page = torch.randn(NOISE_PAGE, self.mel_dim, generator=self.generator)
            self.frames = torch.cat([self.frames, page])
        return self.frames[start:end]


@dataclass(slots=True)
class Code2WavStream:
    """One utterance being decoded: codes so far, its noise, and what has been emitted."""

    speaker: str
    seed: int
    noise: NoiseBuffer
    codes: list[int] = field(default_factory=list)
    finished: bool = False
    chunks_done: int = 0
    mel_tail: torch.Tensor | None = None  # last 2 * overlap_mel emitted mel frames [n, 80]: vocoder context
    samples_emitted: int = 0
    decoding: bool = False  # its next chunk is being decoded in a worker (`Code2Wav.start_decode`)

    def push(self, codes: list[int]) -> None:
        if self.finished:
            raise ValueError("push after finish")
        self.codes.extend(int(c) for c in codes)

    def finish(self) -> None:
        self.finished = True

    @property
    def num_samples(self) -> int:
        """Samples this stream will have emitted once done (so far, while codes still arrive)."""
        return len(self.codes) * SAMPLES_PER_CODE

    @property
    def done(self) -> bool:
        return self.finished and self.samples_emitted == self.num_samples


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """What decoding a stream's next chunk computes; all positions are absolute mel frames."""

    window_start: int  # DiT window [window_start, window_end)
    window_end: int
    emit_start: int  # mel rows of the window output that become new mel: [emit_start, emit_end)
    emit_end: int
    trim_left: int  # samples to drop from the vocoder's output at each side
    trim_right: int
    final: bool


def plan_next(stream: Code2WavStream, config: StreamingConfig) -> ChunkPlan | None:
    """The stream's next chunk, or None when it is not ready (too few codes and not finished, done, or its
    chunk before still decoding).

    A chunk whose codes suffice is never final, even after finish: the chunk boundaries, and so the audio,
    depend on the codes alone, not on how they arrived.
    """
    if stream.decoding:
        return None
    k, total = stream.chunks_done, len(stream.codes) * MEL_PER_CODE
    start, end = config.boundary(k), config.boundary(k + 1)
    future = config.future(k)
    if total >= end + future:
        final = False
    elif stream.finished and not stream.done:
        final, end = True, total
    else:
        return None
    window_end = total if final else end + future
    tail = 0 if stream.mel_tail is None else stream.mel_tail.shape[0]
    audio_start = max(start - config.overlap_mel, 0)
    return ChunkPlan(
        window_start=max(start - config.past_mel, 0),
        window_end=window_end,
        emit_start=start,
        emit_end=end,
        trim_left=(audio_start - (start - tail)) * HOP,
        trim_right=0 if final else config.overlap_mel * HOP,
        final=final,
    )


def advance(stream: Code2WavStream, plan: ChunkPlan, mel: torch.Tensor, samples: int, config: StreamingConfig) -> None:
    """Records a decoded chunk: its new mel [n, 80] (kept as vocoder context) and the samples emitted."""
    context = mel if stream.mel_tail is None else torch.cat([stream.mel_tail, mel])
    stream.mel_tail = context[max(context.shape[0] - 2 * config.overlap_mel, 0) :]
    stream.samples_emitted += samples
    stream.chunks_done += 1
