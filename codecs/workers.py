"""Code2Wav worker processes: each runs `Code2Wav.run_chunks` on the rows of a batch sent to it (CPU only).

A process has its own interpreter lock, so a worker's rows run at the same time as the calling thread's;
threads cannot do that at the tiny shapes, where every stage is mostly Python between small ops. Only plain
data crosses the pipe: the prepared rows go in, their mel and audio come back.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from omnitalk.codecs.code2wav import Code2Wav

JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Chunks:
    """The rows of one Code2Wav batch, prepared from their streams: everything `run_chunks` needs."""

    codes: torch.Tensor  # [n, width / 2] long: each row's window of codes, zero-padded
    x0: torch.Tensor  # [n, width, mel] fp32: each row's window of noise, zero-padded
    lengths: list[int]  # each row's window length in mel frames
    speakers: list[str]
    emit: list[tuple[int, int]]  # each row's new mel, as a range of its window's rows
    tails: list[torch.Tensor | None]  # each row's vocoder context (emitted mel before the chunk)


class WorkerDied(RuntimeError):
    """A Code2Wav worker process exited or stopped answering; the rows it held are lost."""


class Code2WavWorker:
    """One spawned process holding a copy of the DiT, the vocoder and the speakers.

    `submit` then `result`, one batch at a time. The process exits when its pipe closes, so it never outlives
    the process that started it, even one that is killed.
    """

    def __init__(self, model: Code2Wav, threads: int) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy the caller's threads' locks
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, model, threads), name="code2wav", daemon=True)
        self._process.start()
        child.close()
        self._ready = False
        self.busy = False  # a batch was submitted and its result not read yet

    def wait_ready(self) -> None:
        """Returns once the process has loaded its copy (the first `submit` waits for it otherwise)."""
        if self._ready:
            return
        try:
            self._conn.recv()
        except (OSError, EOFError):
            raise WorkerDied(f"the Code2Wav worker (pid {self.pid}) exited with {self._exitcode()}") from None
        self._ready = True

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def submit(self, chunks: Chunks) -> None:
        if self.busy:
            raise RuntimeError("a Code2Wav worker takes one batch at a time")
        self.wait_ready()
        try:
            self._conn.send(chunks)
        except (OSError, EOFError) as error:
            raise WorkerDied(f"the Code2Wav worker (pid {self.pid}) is gone: {error}") from None
        self.busy = True

    def has_answered(self) -> bool:
        """Whether `result` would return (or raise) without waiting."""
        try:
            return self._conn.poll()
        except (OSError, EOFError):
            return True  # gone: `result` raises WorkerDied at once

    def result(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The submitted rows' (mels, waveforms); the worker's own error, or WorkerDied, if it failed."""
        self.busy = False
        try:
            ok, value = self._conn.recv()
        except (OSError, EOFError):
            raise WorkerDied(f"the Code2Wav worker (pid {self.pid}) exited with {self._exitcode()}") from None
        if not ok:
            raise RuntimeError(f"the Code2Wav worker failed: {value}")
        return value

    def close(self) -> None:
        """Stops the process (idempotent): it ends when its pipe closes, and is killed if it does not."""
        self._conn.close()
        self._process.join(JOIN_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _exitcode(self) -> int | None:
        self._process.join(JOIN_TIMEOUT_S)
        return self._process.exitcode


def _serve(conn: Connection, model: Code2Wav, threads: int) -> None:
    """The worker's loop: a batch in, its result (or its error, as text) out, until the pipe closes."""
    torch.set_num_threads(threads)
    try:
        conn.send("ready")
        while True:
            chunks = conn.recv()
            try:
                with torch.no_grad():
                    reply = (True, model.run_chunks(chunks))
            except Exception as error:  # the caller fails the batch's streams; this worker goes on
                reply = (False, f"{type(error).__name__}: {error}")
            conn.send(reply)
    except (OSError, EOFError):  # the caller closed its end (or is gone), even mid-batch
        return
