"""The load generator behind `omnitalk bench`: HTTP chat and Realtime clients, load shapes, metrics, reports."""

from omnitalk.clients.bench.cli import main, main_async
from omnitalk.clients.bench.loads import Load
from omnitalk.clients.bench.runner import BenchConfig, BenchResult, Sweep, run_bench

__all__ = ["BenchConfig", "BenchResult", "Load", "Sweep", "main", "main_async", "run_bench"]
