"""Cost of streaming hidden states out of vLLM: the same requests with and without the tap, alternated in one run.

.venv/bin/python benchmarks/thinker_tap.py [--model DIR] [--rounds 6] [--concurrency 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from omnitalk.engine.request import Message, Sampling, Text, ThinkerRequest
from omnitalk.engine.thinker.engine import ThinkerConfig, ThinkerEngine
from omnitalk.engine.thinker.events import HiddenStates
from omnitalk.engine.tiny.checkpoint import tiny_checkpoint

PROMPT = "Tell me about the history of lighthouses and the people who kept them. " * 4


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
        times: dict[bool, list[float]] = {True: [], False: []}
        rows = 0
        for r in range(args.rounds):
            for tap in (r % 2 == 0, r % 2 != 0):  # alternate which goes first
                elapsed, n = await run_batch(engine, f"r{r}-{tap}", args, tap)
                times[tap].append(elapsed)
                rows += n
        on, off = statistics.median(times[True]), statistics.median(times[False])
        hidden = engine.llm.model_config.get_hidden_size()
        print(f"model {args.model or 'tiny'}  hidden {hidden}  concurrency {args.concurrency}  tokens {args.tokens}")
        print(f"median batch time: tap off {off:.3f} s, tap on {on:.3f} s, ratio on/off {on / off:.3f}")
        print(f"rows streamed per tapped batch: {rows // args.rounds}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
