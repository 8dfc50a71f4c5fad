"""Cost of streaming hidden states out of vLLM: the same requests with and without the tap, alternated in one run.

.venv/bin/python benchmarks/thinker_tap.py [--model DIR] [--rounds 12] [--concurrency 4] [--tokens 64]

Each round runs the batch once with the tap and once without (which goes first alternates), so the two share
the machine's load of the moment. Reported: the median over rounds of each round's on/off ratio of batch wall
time, and the CPU time each process spent per batch (the API process, vLLM's EngineCore and its worker), which
a machine shared with other jobs disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import psutil

from omnitalk.engine.request import Message, Sampling, Text, ThinkerRequest
from omnitalk.engine.thinker.engine import ThinkerConfig, ThinkerEngine
from omnitalk.engine.thinker.events import HiddenStates
from omnitalk.engine.tiny.checkpoint import tiny_checkpoint

PROMPT = "Tell me about the history of lighthouses and the people who kept them. " * 4


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) so far of this process and of each vLLM process it started, by role."""
    totals = {"api": sum(psutil.Process().cpu_times()[:2])}
    for child in psutil.Process().children(recursive=True):
        try:
            name, times = child.name(), child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        role = "worker" if "Worker" in name else "engine core" if "Engine" in name else "other"
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


async def run_batch(engine: ThinkerEngine, tag: str, args: argparse.Namespace, tap: bool) -> tuple[float, int]:
    async def one(i: int) -> int:
        request = ThinkerRequest(
            f"{tag}-{i}",
            (Message("user", (Text(PROMPT),)),),
            Sampling(max_tokens=args.tokens),
            hidden_states=tap,
        )
        return sum(len(e.rows) for e in [e async for e in engine.generate(request)] if isinstance(e, HiddenStates))

    start = time.perf_counter()
    rows = await asyncio.gather(*(one(i) for i in range(args.concurrency)))
    return time.perf_counter() - start, sum(rows)


async def main(args: argparse.Namespace) -> None:
    engine = ThinkerEngine(ThinkerConfig(model=args.model or tiny_checkpoint(), max_model_len=4096, max_num_seqs=16))
    try:
        await run_batch(engine, "warmup", args, tap=True)
        await run_batch(engine, "warmup-off", args, tap=False)
        times: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, dict[str, float]] = {True: {}, False: {}}
        rows = 0
        for r in range(args.rounds):
            for tap in (r % 2 == 0, r % 2 != 0):  # alternate which goes first
                before = cpu_seconds()
                elapsed, n = await run_batch(engine, f"r{r}-{tap}", args, tap)
                for role, seconds in cpu_seconds().items():
                    cpu[tap][role] = cpu[tap].get(role, 0.0) + seconds - before.get(role, 0.0)
                times[tap].append(elapsed)
                rows += n
        report(args, engine, times, cpu, rows)
    finally:
        engine.shutdown()


def report(args: argparse.Namespace, engine: ThinkerEngine, times: dict, cpu: dict, rows: int) -> None:
    on, off = statistics.median(times[True]), statistics.median(times[False])
    ratios = sorted(a / b for a, b in zip(times[True], times[False], strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    hidden = engine.llm.model_config.get_hidden_size()
    print(f"model {args.model or 'tiny'}  hidden {hidden}  concurrency {args.concurrency}  tokens {args.tokens}")
    print(f"median batch time: tap off {off:.3f} s, tap on {on:.3f} s")
    print(f"on/off per round: median {statistics.median(ratios):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}")
    print(f"rows streamed per tapped batch: {rows // args.rounds}")
    per_batch = {tap: {role: seconds / args.rounds * 1e3 for role, seconds in cpu[tap].items()} for tap in cpu}
    roles = sorted(set(per_batch[True]) | set(per_batch[False]))
    cells = [f"{role} off {per_batch[False].get(role, 0):.0f} on {per_batch[True].get(role, 0):.0f}" for role in roles]
    print("CPU ms per batch: " + ", ".join(cells))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
