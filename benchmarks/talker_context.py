"""The talker's decode step at batch 1 against the context it attends over: a session's turn 1 (~500 positions)
against its turn 20 (~6,000), eager, on the CPU.

.venv/bin/python benchmarks/talker_context.py [--shape tiny|7b] [--layers 2] [--contexts 500 2000 6000]
    [--steps 100] [--rounds 3] [--threads 1]

The shapes are benchmarks/talker_prefix.py's. Prints a markdown table: the median step of each round, best round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from talker_prefix import seven_b_talker, tiny_talker

from omnitalk.engine.talker import Talker, TalkerSampling, TalkerSequence


def median_step_s(talker: Talker, context: int, steps: int) -> float:
    """A greedy answer to a `context`-position prompt (random rows); the median of its decode steps."""
    width = talker.config.embedding_size
    rows = torch.randn(context + steps + 1, width, generator=torch.Generator().manual_seed(context))
    seq = TalkerSequence("s", [talker.config.audio_id] * context, "Chelsie",
                         TalkerSampling(temperature=0.0, max_tokens=steps + 1, stop_codes=()))  # fmt: skip
    seq.add_rows(0, rows)
    seq.add_tokens(list(range(7, 7 + steps + 2)))
    talker.add(seq)
    talker.step([seq])  # the prefill
    times = []
    while not seq.finished:
        started = time.perf_counter()
        talker.step([seq])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[500, 2000, 6000])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    talker = tiny_talker() if args.shape == "tiny" else seven_b_talker(args.layers)
    with torch.inference_mode():
        best = {c: min(median_step_s(talker, c, args.steps) for _ in range(args.rounds)) for c in args.contexts}
    shape = "tiny checkpoint" if args.shape == "tiny" else f"7B talker shapes, {args.layers} of 24 layers"
    print("| talker | " + " | ".join(f"step ms at {c}" for c in args.contexts) + " |")
    print("|---|" + "---|" * len(args.contexts))
    print(f"| {shape} | " + " | ".join(f"{1e3 * best[c]:.2f}" for c in args.contexts) + " |")


if __name__ == "__main__":
    main()
