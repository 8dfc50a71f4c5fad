"""Speech stage at Qwen2.5-Omni-7B's shapes: talker + Code2Wav, random weights, a synthetic thinker stream.

.venv/bin/python benchmarks/gpu_speech.py [--tiny] [--streams 1 8 32 64] [--first-chunk-codes 48 24 12]
    [--thinker-tps 170] [--prompt 128] [--thinker-tokens 64] [--codes 500] [--solver rk4] [--json PATH]
    [--threads 1] [--no-transformers]

Without CUDA it runs at the tiny shapes (as `--tiny`). The stage is driven through SpeechEngine's public API
only (open / add_rows / add_tokens / thinker_done / close), as the server drives it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from speech_shapes import build_checkpoint, transformers_one_stream

from omnitalk.codecs.code2wav import Code2Wav
from omnitalk.engine.speech.config import SpeechConfig
from omnitalk.engine.speech.engine import AudioChunk, SpeechDone, SpeechEngine, SpeechEvent
from omnitalk.engine.talker.sampling import TalkerSampling

RATE = 24_000
VOICE = "Chelsie"


@dataclass(slots=True)
class Probe:
    """One stream's events as they arrive on the speech thread."""

    opened: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, samples)
    done_at: float | None = None
    codes: int = 0
    error: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def sink(self, event: SpeechEvent) -> None:
        now = time.perf_counter()
        if isinstance(event, AudioChunk):
            self.chunks.append((now, len(event.samples)))
            return
        if isinstance(event, SpeechDone):
            self.done_at, self.codes = now, event.num_codes
        else:
            self.error = repr(event.error)
        self.finished.set()

    def underruns(self) -> tuple[int, float]:
        """(count, longest) of the waits of a listener who starts playing at the first chunk."""
        count, longest, played_to = 0, 0.0, None
        for arrival, samples in self.chunks:
            if played_to is not None and arrival > played_to:
                count, longest = count + 1, max(longest, arrival - played_to)
            played_to = max(played_to or arrival, arrival) + samples / RATE
        return count, longest


def speech_config(args: argparse.Namespace, streams: int, first_chunk: int) -> SpeechConfig:
    settings: dict[str, Any] = {"device": args.device, "max_streams": streams, "first_chunk_codes": first_chunk}
    settings |= {"ode_solver": args.solver, "enforce_eager": args.enforce_eager}
    return SpeechConfig(**settings, dtype=args.dtype)


def feed(engine: SpeechEngine, probes: list[Probe], rows: torch.Tensor, args: argparse.Namespace) -> None:
    """The thinker, emulated: the prompt's rows and g0 at once, then one row + token per step at thinker_tps."""
    prompt, tokens = args.prompt, args.thinker_tokens
    ids = torch.randint(1000, 100_000, (prompt + tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for i, probe in enumerate(probes):
        probe.opened = time.perf_counter()
        sampling = TalkerSampling(seed=i, max_tokens=args.codes, stop_codes=())  # exactly args.codes codes
        engine.open(f"s{i}", ids[:prompt], None, VOICE, sampling, probe.sink)
        engine.add_rows(f"s{i}", 0, rows[:prompt])
        engine.add_tokens(f"s{i}", [ids[prompt]])
    for step in range(1, tokens):
        time.sleep(max(0.0, start + step / args.thinker_tps - time.perf_counter()))
        for i in range(len(probes)):
            engine.add_rows(f"s{i}", prompt + step - 1, rows[prompt + step - 1 : prompt + step])
            engine.add_tokens(f"s{i}", [ids[prompt + step]])
    for i in range(len(probes)):
        engine.thinker_done(f"s{i}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(engine: SpeechEngine, streams: int, first_chunk: int, args: argparse.Namespace) -> dict[str, Any]:
    engine.reset_stats()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rows = torch.randn(args.prompt + args.thinker_tokens, args.embedding_size, generator=torch.Generator())
    probes = [Probe() for _ in range(streams)]
    feed(engine, probes, rows, args)
    for i, probe in enumerate(probes):
        if not probe.finished.wait(timeout=args.timeout):
            probe.error = "timed out"
        engine.close(f"s{i}")
    failed = [p.error for p in probes if p.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {streams} streams failed: {failed[0]}")
    audio = [sum(n for _, n in p.chunks) / RATE for p in probes]
    spans = [p.done_at - p.opened for p in probes]  # type: ignore[operator]
    first = [p.chunks[0][0] - p.opened for p in probes]
    underruns = [p.underruns() for p in probes]
    stats = engine.stats()
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    return {
        "streams": streams,
        "first_chunk_codes": first_chunk,
        "audio_s_per_stream": statistics.mean(audio),
        "first_audio_ms_p50": 1000 * statistics.median(first),
        "first_audio_ms_max": 1000 * max(first),
        "codes_per_s_per_stream": statistics.mean(p.codes / s for p, s in zip(probes, spans, strict=True)),
        "rtf_p50": statistics.median(s / a for s, a in zip(spans, audio, strict=True)),
        "rtf_p95": percentile([s / a for s, a in zip(spans, audio, strict=True)], 0.95),
        "underruns": sum(n for n, _ in underruns),
        "streams_with_underrun": sum(1 for n, _ in underruns if n),
        "worst_underrun_ms": 1000 * max(longest for _, longest in underruns),
        "worst_talker_gap_ms": 1000 * stats.worst_talker_wait_s,
        "talker_steps": stats.talker_steps,
        "code2wav_batches": stats.code2wav_batches,
        "dit_calls": stats.dit_calls,
        "peak_gpu_gib": peak,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def solver_cost(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One-shot at the same noise: Euler vs RK4 in DiT calls, time and mel difference."""
    code2wav = Code2Wav.from_checkpoint(path, device=args.device, dtype=getattr(torch, args.dtype))
    codes = torch.randint(0, 8193, (args.codes,), generator=torch.Generator().manual_seed(1)).tolist()
    out: dict[str, Any] = {"codes": args.codes}
    mels = {}
    for solver in ("rk4", "euler"):
        before, start = code2wav.dit_calls, time.perf_counter()
        mels[solver], _ = code2wav.one_shot(codes, VOICE, seed=0, solver=solver)
        out[solver] = {"dit_calls": code2wav.dit_calls - before, "seconds": time.perf_counter() - start}
    noise = code2wav.new_stream(VOICE, seed=0).noise.take(0, 2 * args.codes)
    out["euler_vs_rk4_mel_max_abs"] = float((mels["euler"] - mels["rk4"]).abs().max())
    out["rk4_dit_added_max_abs"] = float((mels["rk4"] - noise).abs().max())
    return out


def table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("talker_steps", "code2wav_batches")]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    args.tiny = args.tiny or not torch.cuda.is_available()
    args.device = "cuda" if not args.tiny else args.device or "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # more threads than free cores spin-wait on a shared machine
    with tempfile.TemporaryDirectory(prefix="gpu-speech-") as tmp:
        path, models = build_checkpoint(Path(tmp), args.tiny, args.device)
        args.embedding_size = models.embedding_size
        result: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "shapes": "tiny" if args.tiny else "Qwen2.5-Omni-7B",
            "dtype": args.dtype,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "solver_cost": solver_cost(path, args),
            "loads": [],
        }
        for first_chunk in args.first_chunk_codes:
            engine = SpeechEngine.from_checkpoint(path, speech_config(args, max(args.streams), first_chunk))
            try:
                run_load(engine, 1, first_chunk, args)  # warm-up: lazy inits and graph captures
                result["loads"] += [run_load(engine, n, first_chunk, args) for n in args.streams]
            finally:
                engine.shutdown()
        if args.transformers:
            result["transformers"] = transformers_one_stream(models, args)
    print(table(result["loads"]))
    print(json.dumps({k: v for k, v in result.items() if k != "loads"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    parser.add_argument("--device", help="off CUDA: cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--first-chunk-codes", type=int, nargs="+", default=[48, 24, 12])
    parser.add_argument("--thinker-tps", type=float, default=170.0, help="thinker tokens/s (7B on one H100: ~170)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt rows before the answer")
    parser.add_argument("--thinker-tokens", type=int, default=64, help="text tokens of each answer")
    parser.add_argument("--codes", type=int, default=500, help="codes per answer (50 per second of audio)")
    parser.add_argument("--solver", choices=["rk4", "euler"], default="rk4")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a stream's end")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
