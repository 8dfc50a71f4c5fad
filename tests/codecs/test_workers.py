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

from omnitalk.codecs.code2wav import Code2Wav, shares
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


def test_the_thread_takes_three_quarters_of_a_workers_share_and_none_of_a_single_row() -> None:
    assert shares(8, 1) == [(0, 3), (3, 8)]
    assert shares(7, 1) == [(0, 2), (2, 7)]
    assert shares(1, 1) == [(0, 0), (0, 1)]
    assert shares(9, 2) == [(0, 2), (2, 6), (6, 9)]
    assert shares(2, 3) == [(0, 0), (0, 1), (1, 2)]  # a worker left without rows gets no share
    assert shares(5, 0) == [(0, 5)]


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
    assert alone.dit_calls < model.dit_calls - calls <= 2 * alone.dit_calls  # each share is a solve of its own
    for got, want in zip(split, whole, strict=True):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()  # batched == alone's tolerance


def test_a_worker_killed_while_decoding_fails_its_rows_and_a_fresh_one_takes_over(model: Code2Wav) -> None:
    batch = streams(model, 1)  # a single row: all of it goes to the worker
    audio, offloads = model.start_decode(batch)
    dead = offloads[0].worker.pid
    os.kill(dead, signal.SIGKILL)  # long before its solve (tens of ms) can have finished
    assert len(audio[0]) == 0 and batch[0].decoding and not model.ready(batch[0])
    with pytest.raises(WorkerDied, match="exited"):
        model.collect(offloads[0])
    assert not batch[0].decoding and batch[0].chunks_done == 0  # not advanced: no audio was lost silently
    assert model.workers[0].pid != dead
    fresh = streams(model, 2)
    assert [len(c) for c in decode_all(model, fresh)] == [s.num_samples for s in fresh]


def test_rows_meant_for_a_worker_found_dead_run_in_the_thread(model: Code2Wav) -> None:
    worker = model.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + EXIT_WAIT_S
    while not worker.has_answered() and time.monotonic() < deadline:  # its end of the pipe reads EOF once gone
        time.sleep(0.1)
    dead = worker.pid
    batch = streams(model, 3)
    assert [len(c) for c in decode_all(model, batch)] == [s.num_samples for s in batch]
    assert model.workers[0].pid != dead


def test_a_worker_decodes_while_the_thread_goes_on(model: Code2Wav) -> None:
    """The thread's own share comes back at once, the worker's later, and a decoding stream waits for it."""
    batch = streams(model, 4)
    audio, offloads = model.start_decode(batch)
    (offload,) = offloads
    assert [len(a) > 0 for a in audio] == [True, False, False, False]
    assert offload.indices == [1, 2, 3] and [model.ready(s) for s in batch] == [True, False, False, False]
    alone = model.with_config(model.config)
    expected = alone.decode(streams(alone, 4))
    for got, want in zip(model.collect(offload), expected[1:], strict=True):
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert all(model.ready(s) for s in batch)


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
    _wait_gone(worker)
    assert not _alive(worker)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
