"""benchmarks/gpu_speech.py at the tiny shapes on CPU (the CI smoke run): it runs and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_gpu_speech_benchmark_runs_at_tiny_shapes_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_speech.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_speech.py"), "--tiny", "--streams", "1", "2"]
    command += ["--first-chunk-codes", "24", "12", "--codes", "60", "--prompt", "8", "--thinker-tokens", "30"]
    command += ["--thinker-tps", "400", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["shapes"] == "tiny" and result["device"] == "cpu" and result["dtype"] == "float32"
    loads = result["loads"]
    assert [(r["streams"], r["first_chunk_codes"]) for r in loads] == [(1, 24), (2, 24), (1, 12), (2, 12)]
    for row in loads:
        assert row["audio_s_per_stream"] == 60 / 50  # stop codes off: exactly --codes codes per answer
        assert row["talker_steps"] >= 60 and row["code2wav_batches"] >= 1
        assert row["dit_calls"] % 36 == 0 and row["dit_calls"] > 0  # rk4: 36 DiT calls per solve
        assert 0 < row["first_audio_ms_p50"] <= row["first_audio_ms_max"] and row["rtf_p50"] <= row["rtf_p95"]
    cost = result["solver_cost"]
    assert (cost["rk4"]["dit_calls"], cost["euler"]["dit_calls"]) == (36, 9)
    assert 0 < cost["euler_vs_rk4_mel_max_abs"] < cost["rk4_dit_added_max_abs"]
    reference = result["transformers"]
    assert reference["codes"] == 60 and reference["audio_s"] == 60 / 50 and reference["total_s"] > 0
