"""Code2Wav worker processes: a worker computes what the thread would, a batch split over workers gives the
audio of the unsplit batch, a killed worker fails only its batch and is replaced, and none outlives its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitalk.codecs.code2wav import Code2Wav, split_rows
from omnitalk.codecs.streaming import Code2WavStream, plan_next
from omnitalk.codecs.workers import WorkerDied

EXIT_WAIT_S = 30.0


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Iterator[Code2Wav]:
    model = Code2Wav.from_checkpoint(tiny_dir)
    model.start_workers(1)
    yield model
    model.close()


def streams(model: Code2Wav, n: int, codes: int = 130) -> list[Code2WavStream]:
    made = []
    for i in range(n):
        stream = model.new_stream("Ethan" if i % 2 else "Chelsie", seed=i)
        stream.push(torch.randint(0, 8192, (codes + 9 * i,), generator=torch.Generator().manual_seed(i)).tolist())
        stream.finish()
        made.append(stream)
    return made


def decode_all(model: Code2Wav, batch: list[Code2WavStream]) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in batch]
    while any(model.ready(s) for s in batch):
        for i, chunk in enumerate(model.decode(batch)):
            chunks[i].append(chunk)
    assert all(s.done for s in batch)
    return [np.concatenate(c) for c in chunks]


def test_rows_split_into_near_equal_shares_the_first_never_the_largest() -> None:
    assert split_rows(8, 2) == [(0, 4), (4, 8)]
    assert split_rows(7, 2) == [(0, 3), (3, 7)]
    assert split_rows(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert split_rows(1, 3) == [(0, 1)]


def test_a_worker_computes_exactly_what_the_thread_computes(model: Code2Wav) -> None:
    batch = streams(model, 3)
    model.decode(batch)  # a second chunk has past context and a vocoder tail
    active = [(s, plan) for s in batch if (plan := plan_next(s, model.config)) is not None]
    chunks = model._chunks(active)
    worker = model.workers[0]
    worker.submit(chunks)
    theirs, ours = worker.result(), model.run_chunks(chunks)
    for got, want in zip([*theirs[0], *theirs[1]], [*ours[0], *ours[1]], strict=True):
        assert torch.equal(got, want)


def test_a_batch_split_over_a_worker_gives_the_unsplit_batch_audio(model: Code2Wav) -> None:
    alone = model.with_config(model.config)  # the same weights, no workers: every row in this thread
    calls = model.dit_calls
    split, whole = decode_all(model, streams(model, 5)), decode_all(alone, streams(alone, 5))
    assert model.dit_calls - calls == 2 * alone.dit_calls  # each share is a solve of its own
    for got, want in zip(split, whole, strict=True):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()  # batched == alone's tolerance


def test_a_killed_worker_fails_its_batch_and_a_fresh_one_takes_over(model: Code2Wav) -> None:
    dead = model.workers[0].pid
    os.kill(dead, signal.SIGKILL)
    batch = streams(model, 2)
    with pytest.raises(WorkerDied, match="exited"):
        model.decode(batch)
    assert model.workers[0].pid != dead
    fresh = streams(model, 2)
    assert [len(c) for c in decode_all(model, fresh)] == [s.num_samples for s in fresh]


def test_a_worker_exits_when_its_parent_is_killed(tiny_dir: Path) -> None:
    script = (
        "import sys, time\n"
        "from omnitalk.codecs.code2wav import Code2Wav\n"
        "if __name__ == '__main__':\n"
        f"    model = Code2Wav.from_checkpoint({str(tiny_dir)!r})\n"
        "    model.start_workers(1)\n"
        "    print(model.workers[0].pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + EXIT_WAIT_S
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
