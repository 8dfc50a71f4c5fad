"""How the bench's speech clips fare with streaming input's clamp: sessions restarted, turns that fall back.

.venv/bin/python benchmarks/ingest_clamp.py [--seconds 10] [--seeds 4] [--floors-dbfs none -80 -70 -60 -50 -40]

Each clip is `seconds` of the bench's synthetic vowel speech (`clients.bench.inputs.vowels`, one seed each) plus
white noise at each floor (RMS in dBFS; "none": no noise), sent as Realtime pcm16 at 24 kHz and resampled to
16 kHz as the server does, then replayed through `BlockFeatures` in 100 ms pieces the way `ThinkerIngest` decides
(every block sent as it completes): a restart whenever a completed block moves the clamp of a block sent, and at
the end a fallback if the whole clip's maximum moves it. "before" counts what the earlier rule did: fall back at
the end whenever any block as handed out differs from the whole clip's features. No engine is started.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from omnitalk.clients.bench.inputs import RATE, to_pcm16, vowels
from omnitalk.engine import media
from omnitalk.engine.thinker.features import BLOCK_FRAMES, BlockFeatures, clip_features, clip_log_mel

NUM_MELS = 128
PIECE = 1600  # 100 ms at 16 kHz


def clip(seconds: float, seed: int, floor_dbfs: float | None) -> np.ndarray:
    samples = vowels(seconds, np.random.default_rng(seed))
    if floor_dbfs is not None:
        noise = np.random.default_rng(1000 + seed).standard_normal(len(samples))
        samples = samples + noise * 10 ** (floor_dbfs / 20)
    return media.load_audio(to_pcm16(samples, RATE), format=media.PCM16, sample_rate=RATE)


def replay(samples: np.ndarray) -> tuple[int, bool, bool]:
    """(restarts, falls back at the end now, fell back under the earlier rule)."""
    blocks, handed_out, restarts = BlockFeatures(NUM_MELS), [], 0
    for start in range(0, len(samples), PIECE):
        peak = blocks.peak
        if blocks.append(samples[start : start + PIECE]):
            restarts += blocks.changed(len(handed_out), peak, blocks.peak)
            handed_out += [blocks.block(k) for k in range(len(handed_out), blocks.num_blocks)]
    falls_back = blocks.changed(blocks.num_blocks, blocks.peak, clip_log_mel(samples, NUM_MELS)[1])
    whole = clip_features(samples, NUM_MELS)
    before = not all(
        torch.allclose(block, whole[:, k * BLOCK_FRAMES : (k + 1) * BLOCK_FRAMES], rtol=0.0, atol=1e-5)
        for k, block in enumerate(handed_out)
    )
    return restarts, falls_back, before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--floors-dbfs", nargs="+", default=["none", "-80", "-70", "-60", "-50", "-40"])
    args = parser.parse_args()
    print("| noise floor dBFS | seed | restarts | falls back now | fell back before |\n|---|---|---|---|---|")
    totals = np.zeros(3, int)
    for floor in args.floors_dbfs:
        for seed in range(args.seeds):
            restarts, now, before = replay(clip(args.seconds, seed, None if floor == "none" else float(floor)))
            totals += (restarts, now, before)
            print(f"| {floor} | {seed} | {restarts} | {'yes' if now else 'no'} | {'yes' if before else 'no'} |")
    n = len(args.floors_dbfs) * args.seeds
    print(f"\n{n} clips: {totals[0]} restarts; {totals[1]} fall back now, {totals[2]} fell back before.")


if __name__ == "__main__":
    main()
