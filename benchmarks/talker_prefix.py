"""The talker prefill a session's cached prompt blocks save: a 5,500-row prompt prefilled whole, and with the
5,200-row prompt of the session's previous turn cached (162 full blocks, 5,184 positions), side by side.

.venv/bin/python benchmarks/talker_prefix.py [--shape tiny|7b] [--layers 2] [--prompt 5500] [--cached 5200]
    [--rounds 5] [--threads 1]

`tiny`: the tiny checkpoint's talker (built if missing). `7b`: random weights at the released 7B talker's shapes
(benchmarks/speech_shapes.py) with `--layers` of its 24 layers, fp32 on the CPU: a prefill's cost per layer is
that of the 7B, and both columns scale alike with the layer count. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import torch

from omnitalk.engine.talker import Talker, TalkerSampling, TalkerSequence
from omnitalk.engine.talker.config import TalkerConfig
from omnitalk.engine.talker.model import TalkerModel
from omnitalk.engine.talker.runner import BLOCK_SIZE
from omnitalk.engine.tiny.checkpoint import tiny_checkpoint

SESSION = "bench"
POOL_TOKENS = 32_768
TEXT_VOCAB = 1024  # the 7b shape's token table: only placeholder, speaker and text end ids are looked up
SEVEN_B = {"hidden_size": 896, "intermediate_size": 18944, "num_heads": 12, "num_kv_heads": 4, "head_dim": 128,
           "embedding_size": 3584, "vocab_size": 8448, "mrope_section": (16, 24, 24)}  # fmt: skip


def seven_b_talker(layers: int) -> Talker:
    ids = {"audio_id": 1001, "image_id": 1002, "video_id": 1003, "text_eos_id": 1004, "text_pad_id": 1005}
    config = TalkerConfig(num_layers=layers, **SEVEN_B, **ids)
    torch.manual_seed(0)
    model = TalkerModel(config, TEXT_VOCAB)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 1:  # matrices and tables; norms stay at one, biases as initialised
                parameter.normal_(0, 0.02)
    model.eval()
    num_blocks = POOL_TOKENS // BLOCK_SIZE
    return Talker(model, {"Chelsie": 1000}, max_seqs=2, num_blocks=num_blocks, block_size=BLOCK_SIZE)


def tiny_talker() -> Talker:
    return Talker.from_checkpoint(tiny_checkpoint(), max_seqs=2, memory_gib=POOL_TOKENS * 512 / 2**30)


def chain(tag: str, length: int) -> list[bytes]:
    keys, previous = [], tag.encode()
    for i in range(length):
        previous = hashlib.blake2b(previous + i.to_bytes(8, "little"), digest_size=16).digest()
        keys.append(previous)
    return keys


def sequence(talker: Talker, name: str, rows: torch.Tensor, keys: list[bytes] | None) -> TalkerSequence:
    """A one-code answer: its only step is the prefill."""
    prompt_len = len(rows) - 1
    seq = TalkerSequence(name, [talker.config.audio_id] * prompt_len, "Chelsie", TalkerSampling(temperature=0.0,
                         max_tokens=1), None, SESSION if keys else None, tuple(keys) if keys else None)  # fmt: skip
    seq.add_rows(0, rows)
    seq.add_tokens([7, 8])
    seq.thinker_done()
    return seq


def prefill_s(talker: Talker, seq: TalkerSequence) -> float:
    talker.add(seq)
    started = time.perf_counter()
    talker.step([seq])
    elapsed = time.perf_counter() - started
    assert seq.finished
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "7b"), default="7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=5500)
    parser.add_argument("--cached", type=int, default=5200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    talker = tiny_talker() if args.shape == "tiny" else seven_b_talker(args.layers)
    rows = torch.randn(args.prompt + 1, talker.config.embedding_size, generator=torch.Generator().manual_seed(1))
    shared = chain("conversation", args.cached)
    with torch.inference_mode():
        prefill_s(talker, sequence(talker, "previous-turn", rows[: args.cached + 1], shared))
        full, cached, positions = [], [], set()
        for r in range(args.rounds):
            # each round's new positions get fresh keys, so no round finds the blocks an earlier one registered
            keys = shared + chain(f"round-{r}", args.prompt - args.cached)
            full.append(prefill_s(talker, sequence(talker, f"full-{r}", rows, None)))
            seq = sequence(talker, f"cached-{r}", rows, keys)
            cached.append(prefill_s(talker, seq))
            positions.add(seq.num_prefix_tokens)
    full_ms, cached_ms = statistics.median(full) * 1e3, statistics.median(cached) * 1e3
    shape = "tiny checkpoint" if args.shape == "tiny" else f"7B talker shapes, {args.layers} of 24 layers"
    print(f"| {shape} | {args.prompt} | {sorted(positions)} | {full_ms:.1f} | {cached_ms:.1f} | "
          f"{full_ms / cached_ms:.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
