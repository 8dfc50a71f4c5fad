"""PNG plots of a bench: latency CDFs, TTFA and RTF against the load (sweeps, concurrency lists, ramps), and
voice-to-voice turn latency against the utterance's length and the turn's number in its session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from omnitalk.clients.bench.metrics import turn_latency_by
from omnitalk.clients.bench.runner import BenchResult, RunResult

CDF_METRICS = (("TTFT", "ttft_s"), ("TTFA", "ttfa_s"), ("E2EL", "e2el_s"))


def write_plots(result: BenchResult, folder: Path) -> list[Path]:
    """Writes the plots that fit `result` into `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = [_cdfs(plt, result.runs, folder / "latency_cdf.png")]
    if any(run.load.kind == "ramp" for run in result.runs):
        written.append(_ramp(plt, [r for r in result.runs if r.load.kind == "ramp"], folder / "ttfa_rtf_vs_rate.png"))
    by_level = [r for r in result.runs if r.load.kind != "ramp"]
    if len({_level(r) for r in by_level}) > 1:
        written.append(_versus_level(plt, by_level, folder / "ttfa_rtf_vs_load.png"))
    if any(r.turn_s is not None for run in result.runs for r in run.records):
        written.append(_turns(plt, result.runs, folder / "turn_latency.png"))
    return written


def _turns(plt: Any, runs: list[RunResult], path: Path) -> Path:
    """Each turn's latency against its utterance's length and against its number in the session, with the median
    of each group as a line; one colour per run."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, xlabel in ((axes[0], "input_audio_s", "utterance (s)"), (axes[1], "turn_number", "turn number")):
        for run in runs:
            done = [r for r in run.records if r.success and r.turn_s is not None]
            if not done:
                continue
            x = [round(r.input_audio_s, 1) if key == "input_audio_s" else r.turn_number for r in done]
            (points,) = ax.plot(x, [r.turn_s * 1e3 for r in done], ".", alpha=0.5)
            groups = turn_latency_by(done, key)
            ax.plot(list(groups), [g["median_turn_ms"] for g in groups.values()], "-", color=points.get_color(),
                    label=f"{_label(run)} (median)")  # fmt: skip
        ax.set(title=f"turn latency by {xlabel.split(' (')[0]}", xlabel=xlabel, ylabel="ms", ylim=(0, None))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    return _save(plt, figure, path)


def _label(run: RunResult) -> str:
    return f"{run.protocol}, {run.load.label}"


def _level(run: RunResult) -> tuple[str, float]:
    """A run's load as a point on an axis: its concurrency, or its offered rate."""
    return ("concurrency", run.load.concurrency) if run.load.kind == "concurrency" else ("rate", run.load.rate)


def _cdfs(plt: Any, runs: list[RunResult], path: Path) -> Path:
    figure, axes = plt.subplots(1, len(CDF_METRICS), figsize=(5 * len(CDF_METRICS), 4), squeeze=False)
    for ax, (title, name) in zip(axes[0], CDF_METRICS, strict=True):
        for run in runs:
            values = np.sort([v * 1e3 for r in run.records if r.success and (v := r.value(name)) is not None])
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=_label(run))
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="share of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    if any(ax.lines for ax in axes[0]):
        axes[0][0].legend(fontsize="small")
    return _save(plt, figure, path)


def _versus_level(plt: Any, runs: list[RunResult], path: Path) -> Path:
    """p50 and p90 of TTFA and RTF for each run, against its concurrency or rate; one line per protocol."""
    figure, (ttfa_ax, rtf_ax) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = {_level(r)[0] for r in runs}
    xlabel = "concurrency" if kinds == {"concurrency"} else "offered rate (requests/s)"
    for protocol in sorted({r.protocol for r in runs}):
        mine = sorted((r for r in runs if r.protocol == protocol), key=lambda r: _level(r)[1])
        x = [_level(r)[1] for r in mine]
        for ax, name, scale in ((ttfa_ax, "ttfa_s", 1e3), (rtf_ax, "rtf", 1.0)):
            for q, style in ((50, "-o"), (90, "--^")):
                ax.plot(x, [_percentile(r, name, q, scale) for r in mine], style, label=f"{protocol} p{q}")
    ttfa_ax.set(title="time to first audio", xlabel=xlabel, ylabel="ms")
    rtf_ax.set(title="real-time factor", xlabel=xlabel, ylabel="RTF (< 1: faster than real time)")
    rtf_ax.axhline(1.0, color="grey", lw=0.8)
    for ax in (ttfa_ax, rtf_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(plt, figure, path)


def _ramp(plt: Any, runs: list[RunResult], path: Path) -> Path:
    """Each request's TTFA and RTF against the rate offered when it was sent."""
    figure, (ttfa_ax, rtf_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        done = [r for r in run.records if r.success and r.offered_rate is not None]
        for ax, name, scale in ((ttfa_ax, "ttfa_s", 1e3), (rtf_ax, "rtf", 1.0)):
            points = [(r.offered_rate, v * scale) for r in done if (v := r.value(name)) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), ".", alpha=0.6, label=_label(run))
    ttfa_ax.set(title="time to first audio during the ramp", xlabel="offered rate (requests/s)", ylabel="ms")
    rtf_ax.set(title="real-time factor during the ramp", xlabel="offered rate (requests/s)", ylabel="RTF")
    rtf_ax.axhline(1.0, color="grey", lw=0.8)
    for ax in (ttfa_ax, rtf_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    return _save(plt, figure, path)


def _percentile(run: RunResult, name: str, q: float, scale: float) -> float:
    values = [v * scale for r in run.records if r.success and (v := r.value(name)) is not None]
    return float(np.percentile(values, q)) if values else float("nan")


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
