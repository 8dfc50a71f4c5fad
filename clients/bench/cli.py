"""`omnitalk bench`: load-test an omnitalk (or any OpenAI-compatible speech) server over HTTP chat and Realtime."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import sys
import time
from pathlib import Path

import httpx

from omnitalk.clients.bench.inputs import (
    JSONL_SCHEMA,
    BenchInput,
    load_jsonl,
    spoken_inputs,
    text_inputs,
    utterance_inputs,
)
from omnitalk.clients.bench.loads import Load
from omnitalk.clients.bench.metrics import SLO_KEYS, parse_slos
from omnitalk.clients.bench.report import LineProgress, console_report, results_json, write_json
from omnitalk.clients.bench.runner import BenchConfig, NoProgress, Sweep, run_bench
from omnitalk.clients.bench.sessions import TURN_DETECTIONS, TurnTaking

EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE = 1, 2, 2
EPILOG = f"""\
loads (pick one; default --concurrency 1):
  --concurrency 1 2 4    keep N requests in flight (one run per value)
  --rate 2 --burstiness 1  arrivals with Gamma(b, 1/(rate*b)) gaps: b=1 Poisson, b<1 burstier (vllm bench serve)
  --ramp 0.5 4           rate rising linearly from 0.5 to 4 requests/s over --duration (or --num-requests)
  --sweep --slo ttfa:500 rtf:1  the highest Poisson rate at which every SLO holds (doubling, then bisection)

Realtime turns (--protocol realtime):
  --turn-detection server_vad --utterance-s 2 10 30  speak each utterance in real time, then silence, into an
                         always-open microphone; the server's VAD ends the turn and answers. turn = voice-to-voice
                         latency: end of the speech in the audio -> first audio byte of the answer
  --turns 20             turns per session (sessions are reused turn after turn): turn latency against turn number

SLOs (--slo KEY:VALUE ...): {", ".join(SLO_KEYS)}; milliseconds, except rtf (unitless).
A request is good when it succeeded and met every SLO; request_goodput = good requests / duration.

--inputs PATH.jsonl: {JSONL_SCHEMA}

exit status: 0 all requests succeeded, 1 some failed, 2 the server could not be reached (or bad arguments)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnitalk bench", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--url", required=True, help="the server's root, e.g. http://127.0.0.1:8000")
    p.add_argument("--protocol", choices=("http", "realtime", "both"), default="http")
    p.add_argument("--model", help="model name to send (default: the first of the server's /v1/models)")
    p.add_argument("--voice", default="alloy")
    p.add_argument("--max-tokens", type=int, default=64, help="the answer's token budget (default 64)")
    p.add_argument("--inputs", default="text", help="text (built-in prompts), speech (them spoken) or PATH.jsonl")
    p.add_argument("--utterance-s", type=float, nargs="+", metavar="S",
                   help="instead of --inputs: one synthetic spoken utterance of each length (seconds)")  # fmt: skip
    p.add_argument("--turn-detection", choices=TURN_DETECTIONS, default="manual",
                   help="Realtime turns: manual (append, commit, response.create; default) or server_vad")  # fmt: skip
    p.add_argument("--turns", type=int, default=1, help="Realtime turns per session (default 1)")
    p.add_argument("--vad-silence-ms", type=int, default=500,
                   help="server_vad: the silence that ends a turn (silence_duration_ms, default 500)")  # fmt: skip
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, nargs="+", metavar="N")
    load.add_argument("--rate", type=float, metavar="REQ_PER_S")
    load.add_argument("--ramp", type=float, nargs=2, metavar=("START", "END"))
    load.add_argument("--sweep", action="store_true")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, help="rate loads: at most this many requests in flight")
    p.add_argument("--num-requests", type=int, help="requests per run (default 16 unless --duration is given)")
    p.add_argument("--duration", type=float, help="seconds per run: no request is sent after it")
    p.add_argument("--sweep-start", type=float, default=1.0, help="first rate of a sweep (default 1/s)")
    p.add_argument("--max-rate", type=float, default=64.0, help="highest rate a sweep tries (default 64/s)")
    p.add_argument("--max-runs", type=int, default=8, help="runs a sweep may spend (default 8)")
    p.add_argument("--sweep-duration", type=float, default=10.0, help="seconds of arrivals per sweep run")
    p.add_argument("--attainment", type=float, default=0.9,
                   help="share of a sweep run's requests that must meet every SLO (default 0.9)")  # fmt: skip
    p.add_argument("--slo", nargs="+", default=[], metavar="KEY:VALUE")
    p.add_argument("--result-json", type=Path, help="default results/bench-<timestamp>.json")
    p.add_argument("--plot-dir", type=Path, help="default: next to the JSON, <its name>-plots/")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--warmups", type=int, default=0, help="requests sent first, one by one, not recorded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(sys.argv[1:] if argv is None else argv))


async def main_async(argv: list[str]) -> int:
    """Parse, check the server, run, report; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    try:
        slos = parse_slos(args.slo)
        loads = make_loads(args)
        sweep = make_sweep(args, slos) if args.sweep else None
        turn_taking = TurnTaking(args.turn_detection, args.turns, args.vad_silence_ms)
        if args.utterance_s and min(args.utterance_s) < 0.1:
            raise ValueError("--utterance-s lengths must be at least 0.1 s")
        if args.max_tokens < 1 or args.timeout <= 0 or args.warmups < 0:
            raise ValueError("--max-tokens and --timeout must be positive, --warmups at least 0")
    except ValueError as error:
        parser.error(str(error))
    try:
        inputs, notes = make_inputs(args.inputs, args.seed, args.utterance_s)
    except (ValueError, OSError) as error:
        return _fail(f"bad --inputs: {error}", EXIT_USAGE)
    base_url = normalize_url(args.url)
    try:
        listed = await server_model(base_url)  # also tells an unreachable server early
        model = args.model or listed
    except httpx.TransportError as error:
        reason = str(error) or type(error).__name__
        return _fail(f"cannot reach {base_url}: {reason}. Is the server running at that address?", EXIT_UNREACHABLE)
    for note in notes:
        print(f"omnitalk bench: {note}", file=sys.stderr)
    protocols = ("http", "realtime") if args.protocol == "both" else (args.protocol,)
    config = BenchConfig(
        base_url, model, inputs, loads, protocols, voice=args.voice, max_tokens=args.max_tokens, slos=slos,
        sweep=sweep, burstiness=args.burstiness, max_concurrency=args.max_concurrency, timeout=args.timeout,
        warmups=args.warmups, seed=args.seed, turn_taking=turn_taking,
    )  # fmt: skip
    result = await run_bench(config, NoProgress() if args.no_progress else LineProgress())
    print(console_report(config, result))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.result_json or Path("results") / f"bench-{stamp}.json"
    write_json(json_path, results_json(config, result, notes))
    print(f"results: {json_path}", file=sys.stderr)
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print("plots: skipped, matplotlib is not installed (pip install 'omnitalk[plots]')", file=sys.stderr)
    elif not args.no_plots:
        from omnitalk.clients.bench.plots import write_plots

        plot_dir = args.plot_dir or json_path.with_name(json_path.stem + "-plots")
        for path in write_plots(result, plot_dir):
            print(f"plot: {path}", file=sys.stderr)
    records = [r for run in result.runs for r in run.records]
    return EXIT_FAILED if not records or any(not r.success for r in records) else 0


def make_loads(args: argparse.Namespace) -> list[Load]:
    n, duration = args.num_requests, args.duration
    if n is None and duration is None:
        n = 16
    common = {"num_requests": n, "duration": duration, "burstiness": args.burstiness}
    if args.rate is not None:
        return [Load("rate", rate=args.rate, max_concurrency=args.max_concurrency, **common)]
    if args.ramp is not None:
        start, end = args.ramp
        return [Load("ramp", rate=start, end_rate=end, max_concurrency=args.max_concurrency, **common)]
    return [Load("concurrency", concurrency=c, **common) for c in args.concurrency or [1]]


def make_sweep(args: argparse.Namespace, slos: dict[str, float]) -> Sweep:
    if not slos:
        raise ValueError("--sweep needs --slo: the SLOs define the rate it looks for")
    if not (0 < args.attainment <= 1) or args.max_runs < 1 or not (0 < args.sweep_start <= args.max_rate):
        raise ValueError("a sweep needs 0 < --attainment <= 1, --max-runs >= 1 and 0 < --sweep-start <= --max-rate")
    return Sweep(args.sweep_start, args.max_rate, args.max_runs, args.sweep_duration, attainment=args.attainment)


def make_inputs(kind: str, seed: int, utterance_s: list[float] | None = None) -> tuple[list[BenchInput], list[str]]:
    if utterance_s:
        inputs, note = utterance_inputs(utterance_s, seed)
        return inputs, [note]
    if kind == "text":
        return text_inputs(), []
    if kind == "speech":
        inputs, note = spoken_inputs(seed)
        return inputs, [note]
    return load_jsonl(Path(kind)), []


def normalize_url(url: str) -> str:
    """The server's root: http(s)://host:port, from that or a ws(s):// or …/v1… URL."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    for suffix in ("/v1/chat/completions", "/v1/realtime", "/v1"):
        rest = rest.split("?", 1)[0].removesuffix(suffix)
    return f"{scheme}://{rest}"


async def server_model(base_url: str) -> str:
    """The first model the server lists ("default" when it lists none). Raises httpx.TransportError if the
    server cannot be reached."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        response = await http.get(base_url + "/v1/models")
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "default"


def _fail(message: str, status: int) -> int:
    print(f"omnitalk bench: {message}", file=sys.stderr)
    return status
