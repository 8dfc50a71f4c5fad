"""What the bench shows and keeps: a progress bar on stderr, console tables, and the JSON results file."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from omnitalk.clients.bench.metrics import PERCENTILES, RequestRecord, turn_latency_by
from omnitalk.clients.bench.runner import BenchConfig, BenchResult, RunResult

# (label, metric name in the aggregates, unit suffix) for the detailed table.
DETAIL_ROWS = (
    ("TTFT (ms)", "ttft", "_ms"),
    ("TPOT (ms)", "tpot", "_ms"),
    ("ITL (ms)", "itl", "_ms"),
    ("E2EL (ms)", "e2el", "_ms"),
    ("TTFA (ms)", "ttfa", "_ms"),
    ("turn (ms)", "turn", "_ms"),
    ("RTF", "rtf", ""),
    ("audio jitter (ms)", "jitter", "_ms"),
    ("worst underrun (ms)", "underrun", "_ms"),
)


class LineProgress:
    """A progress bar on stderr: tqdm's when it is installed, else one line rewritten in place."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream, self.bar, self.label, self.total, self.done, self.failed = stream, None, "", None, 0, 0
        self.began = time.perf_counter()
        try:
            import tqdm

            self.tqdm = tqdm.tqdm
        except ImportError:
            self.tqdm = None

    def start(self, label: str, total: int | None) -> None:
        self.label, self.total, self.done, self.failed, self.began = label, total, 0, 0, time.perf_counter()
        if self.tqdm is not None:
            self.bar = self.tqdm(total=total, desc=label, unit="req", file=self.stream, leave=True)
        else:
            self._draw()

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.success
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed, refresh=False)
        else:
            self._draw()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        else:
            self._draw()
            self.stream.write("\n")

    def _draw(self) -> None:
        total = "?" if self.total is None else self.total
        elapsed = time.perf_counter() - self.began
        line = f"\r{self.label}: {self.done}/{total} requests, {self.failed} failed, {elapsed:.1f} s"
        self.stream.write(line)
        self.stream.flush()


def results_json(config: BenchConfig, result: BenchResult, notes: list[str]) -> dict[str, Any]:
    """Everything a run measured: the settings, per-run aggregates, per-request records, the sweeps."""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_url": config.base_url,
        "model": config.model,
        "voice": config.voice,
        "max_tokens": config.max_tokens,
        "protocols": list(config.protocols),
        "inputs": {"count": len(config.inputs), "ids": [i.id for i in config.inputs]},
        "notes": notes,
        "slos": config.slos,
        "seed": config.seed,
        "definitions": DEFINITIONS,
        "runs": [run_json(run, config.slos) for run in result.runs],
        "sweeps": {
            protocol: {"best_rate": sweep.best_rate, "tried": [{"rate": r, "slos_held": ok} for r, ok in sweep.tried]}
            for protocol, sweep in result.sweeps.items()
        },
    }


def run_json(run: RunResult, slos: dict[str, float]) -> dict[str, Any]:
    return {
        "protocol": run.protocol,
        "load": {**asdict(run.load), "label": run.load.label},
        "started_at": run.started_at,
        "metrics": run.metrics(slos),
        "turn_latency": {
            "by_utterance_s": turn_latency_by(run.records, "input_audio_s"),
            "by_turn_number": turn_latency_by(run.records, "turn_number"),
        },
        "requests": [r.to_json() for r in run.records],
    }


DEFINITIONS = {
    "request start": "HTTP: the POST is sent. Realtime: response.create is sent (after the input was uploaded); "
    "with server VAD, input_audio_buffer.speech_stopped arrives",
    "turn": "voice-to-voice turn latency: from the end of the user's speech (the moment its last sample was sent, "
    "paced as a live microphone) to the first audio byte of the answer; with server VAD it includes the silence "
    "that ends the turn",
    "ttft": "time to the first SSE chunk with non-empty choices (Realtime: the first response.output_* delta)",
    "itl": "gaps between successive chunks carrying text (content or audio transcript), from the TTFT chunk",
    "e2el": "time to the last chunk with non-empty choices (Realtime: response.done); the usage chunk is excluded",
    "tpot": "(e2el - ttft) / (completion_tokens - 1), completion_tokens as the server's usage reports it",
    "ttfa": "time to the first audio byte: first non-empty delta.audio.data or response.output_audio.delta",
    "rtf": "(arrival of the last audio byte - request start) / audio seconds received; < 1 is faster than real time",
    "audio_s": "pcm16 bytes received / 48000 (mono, 24 kHz)",
    "jitter": "standard deviation of the gaps between audio chunk arrivals",
    "underrun": "a player that starts at the first chunk and plays in real time without a buffer: its starvation",
    "goodput": "requests that succeeded and met every SLO, per second of the run (DistServe, vllm bench serve)",
}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def run_table(metrics: dict[str, Any]) -> str:
    """One run's latency and audio metrics: mean and percentiles."""
    header = ["metric", "mean", *(f"p{p}" for p in PERCENTILES)]
    rows = []
    for label, name, unit in DETAIL_ROWS:
        digits = 3 if name == "rtf" else 1
        stats = ["mean", *(f"p{p}" for p in PERCENTILES)]
        rows.append([label, *(_fmt(metrics[f"{s}_{name}{unit}"], digits) for s in stats)])
    return table(header, rows)


def summary_table(runs: list[RunResult], slos: dict[str, float]) -> str:
    """One row per run: its load, counts, throughputs and the headline latencies."""
    header = ["protocol", "load", "done", "failed", "s", "req/s", "goodput", "audio s/s", "tok/s",
              "p50 TTFT", "p50 TTFA", "p99 TTFA", "p50 turn", "p50 E2EL", "p50 RTF", "p99 RTF",
              "underrun ev"]  # fmt: skip
    rows = []
    for run in runs:
        m = run.metrics(slos)
        rows.append([
            run.protocol, run.load.label, str(m["completed"]), str(m["failed"]), _fmt(m["duration"]),
            _fmt(m["request_throughput"], 2), _fmt(m["request_goodput"], 2), _fmt(m["audio_throughput"], 2),
            _fmt(m["output_throughput"]), _fmt(m["median_ttft_ms"]), _fmt(m["median_ttfa_ms"]),
            _fmt(m["p99_ttfa_ms"]), _fmt(m["median_turn_ms"]), _fmt(m["median_e2el_ms"]), _fmt(m["median_rtf"], 3),
            _fmt(m["p99_rtf"], 3), str(m["underrun_events"]),
        ])  # fmt: skip
    return table(header, rows)


def turn_table(label: str, groups: dict[float, dict[str, float | None]]) -> str:
    header = [label, "turns", "mean", *(f"p{p}" for p in PERCENTILES)]
    stats = ["mean", *(f"p{p}" for p in PERCENTILES)]
    rows = [[f"{at:g}", str(g["count"]), *(_fmt(g[f"{s}_turn_ms"]) for s in stats)] for at, g in groups.items()]
    return table(header, rows)


def console_report(config: BenchConfig, result: BenchResult) -> str:
    """The summary of every run, each run's detail when there are few, and the sweeps' answers."""
    parts = ["latencies in ms; goodput and req/s in requests/s; audio s/s: seconds of audio received per second",
             summary_table(result.runs, config.slos)]  # fmt: skip
    if len(result.runs) <= 2 * len(config.protocols) and not result.sweeps:
        for run in result.runs:
            parts += [f"\n{run.protocol}, {run.load.label}:", run_table(run.metrics(config.slos))]
    for run in result.runs:
        for key, label in (("input_audio_s", "utterance s"), ("turn_number", "turn")):
            if len(groups := turn_latency_by(run.records, key)) > 1:
                parts += [
                    f"\n{run.protocol}, {run.load.label}: turn latency (ms) by {label}:",
                    turn_table(label, groups),
                ]
    for protocol, sweep in result.sweeps.items():
        slos = " ".join(f"{k}:{v:g}" for k, v in config.slos.items())
        best = f"{sweep.best_rate:.3g} requests/s" if sweep.best_rate else "none of the rates tried"
        parts.append(f"\n{protocol}: highest rate meeting every SLO ({slos}): {best} ({len(sweep.tried)} runs)")
    first_error = next((r.error for run in result.runs for r in run.records if r.error), None)
    if first_error:
        failed = sum(not r.success for run in result.runs for r in run.records)
        parts.append(f"\n{failed} request(s) failed; first error: {first_error}")
    return "\n".join(parts)
