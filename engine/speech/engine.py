"""The speech thread: talker steps and Code2Wav chunks of every live stream on one device, by playback deadline."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omnitalk.codecs.code2wav import Code2Wav
from omnitalk.codecs.streaming import Code2WavStream
from omnitalk.engine.failure import EngineFailure
from omnitalk.engine.speech.config import SpeechConfig
from omnitalk.engine.speech.policy import Candidate, PlaybackClock, Work, choose
from omnitalk.engine.talker.runner import Talker
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.engine.talker.sequence import TalkerSequence

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AudioChunk:
    offset: int  # sample index of the first sample in the utterance
    samples: np.ndarray  # float32 mono, 24 kHz


@dataclass(frozen=True, slots=True)
class SpeechDone:
    num_codes: int
    finish_reason: str  # the talker's: "stop", "length", "empty"


@dataclass(frozen=True, slots=True)
class SpeechFailed:
    error: Exception


SpeechEvent = AudioChunk | SpeechDone | SpeechFailed
Sink = Callable[[SpeechEvent], None]  # called on the speech thread; must not block


@dataclass(slots=True)
class _Stream:
    seq: TalkerSequence
    audio: Code2WavStream
    clock: PlaybackClock
    sink: Sink


@dataclass(frozen=True, slots=True)
class _Command:
    name: str  # "open", "rows", "tokens", "thinker_done", "close", "stop"
    key: str = ""
    args: tuple = ()


class SpeechEngine:
    """Owns the talker and Code2Wav; everything else talks to it through thread-safe commands."""

    def __init__(
        self, talker: Talker, code2wav: Code2Wav, max_batch: int = 64, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.talker, self.code2wav, self.max_batch, self._now = talker, code2wav, max_batch, clock
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._waiting: list[str] = []  # opened, no talker slot yet (admitted in arrival order)
        self._stopping = False
        self.num_failures = 0  # times the thread failed and restarted in place
        self._thread = threading.Thread(target=self._run, name="omnitalk-speech", daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: SpeechConfig, max_len: int = 4096) -> SpeechEngine:
        """`max_len` bounds each stream's talker cache: its prompt + 2 + codes (slots are preallocated)."""
        talker = Talker.from_checkpoint(path, device=config.device, max_slots=config.max_streams, max_len=max_len)
        code2wav = Code2Wav.from_checkpoint(path, device=config.device)
        return cls(talker, code2wav, max_batch=config.max_streams)

    @property
    def voices(self) -> list[str]:
        return sorted(self.talker.speakers)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # Commands, callable from any thread.
    def open(
        self,
        key: str,
        prompt_ids: list[int],
        positions: torch.Tensor | None,
        voice: str,
        sampling: TalkerSampling,
        sink: Sink,
    ) -> None:
        """Starts a stream; raises ValueError for an unknown voice. Audio noise is seeded like the talker."""
        if not self._thread.is_alive():
            raise EngineFailure("the speech thread is not running")
        if voice not in self.talker.speakers:
            raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.voices)}")
        seq = TalkerSequence(key, list(prompt_ids), speaker=voice, sampling=sampling, positions=positions)
        audio = self.code2wav.new_stream(voice, seed=sampling.seed or 0)
        self._send("open", key, _Stream(seq, audio, PlaybackClock(self._now()), sink))

    def add_rows(self, key: str, first_position: int, rows: torch.Tensor) -> None:
        self._send("rows", key, first_position, rows)

    def add_tokens(self, key: str, token_ids: list[int]) -> None:
        self._send("tokens", key, token_ids)

    def thinker_done(self, key: str) -> None:
        self._send("thinker_done", key)

    def close(self, key: str) -> None:
        """Idempotent: frees the stream's talker slot and drops its audio, finished or not."""
        self._send("close", key)

    def shutdown(self) -> None:
        self._stopping = True
        self._send("stop")
        self._thread.join(timeout=10)

    def _send(self, name: str, key: str = "", *args: object) -> None:
        self._inbox.put(_Command(name, key, args))

    @property
    def failure(self) -> str | None:
        """Why the speech thread cannot serve (it is gone), or None while it runs."""
        return None if self._thread.is_alive() or self._stopping else "the speech thread is not running"

    # The speech thread.
    def _run(self) -> None:
        """Restarts in place after any failure: every stream it held fails at once, new ones are served."""
        while True:
            try:
                if self._step():
                    return
            except Exception:
                log.exception("the speech thread failed; failing its %d streams and going on", len(self._streams))
                self.num_failures += 1
                self._fail_all(EngineFailure("the speech stage failed; this response's audio was lost"))

    def _step(self) -> bool:
        """One round: commands in, one batch of work out. True once told to stop."""
        work = choose(self._candidates(), self.max_batch)
        commands = self._drain(block=work is None)
        for command in commands:
            if command.name == "stop":
                return True
            self._apply(command)
        if commands:
            work = choose(self._candidates(), self.max_batch)  # the inputs changed
        if work is not None:
            self._do(*work)
        return False

    def _fail_all(self, error: Exception) -> None:
        streams, self._streams, self._waiting = self._streams, {}, []
        for stream in streams.values():
            try:
                self.talker.free(stream.seq)
            except Exception:
                log.exception("freeing the talker slot of %s failed", stream.seq.request_id)
            stream.sink(SpeechFailed(error))

    def _drain(self, block: bool) -> list[_Command]:
        commands = [self._inbox.get()] if block else []
        try:
            while True:
                commands.append(self._inbox.get_nowait())
        except queue.Empty:
            return commands

    def _apply(self, command: _Command) -> None:
        if command.name == "open":
            self._streams[command.key] = command.args[0]
            self._waiting.append(command.key)
            self._admit()
            return
        stream = self._streams.get(command.key)
        if stream is None:
            return  # closed already: late input is dropped
        try:
            match command.name:
                case "rows":
                    stream.seq.add_rows(*command.args)
                case "tokens":
                    stream.seq.add_tokens(*command.args)
                case "thinker_done":
                    stream.seq.thinker_done()
                    self._after_talker(stream)
                case "close":
                    self._drop(command.key)
        except Exception as error:  # bad input for one stream fails that stream only
            self._fail(command.key, error)

    def _admit(self) -> None:
        while self._waiting and self.talker.num_free_slots:
            key = self._waiting.pop(0)
            if key in self._streams:
                try:
                    self.talker.add(self._streams[key].seq)
                except ValueError as error:  # e.g. a prompt longer than the talker's cache
                    self._fail(key, error)

    def _candidates(self) -> list[Candidate]:
        return [
            Candidate(
                key,
                s.clock.deadline(),
                talker_ready=s.seq.slot is not None and s.seq.ready,
                code2wav_ready=self.code2wav.ready(s.audio),
            )
            for key, s in self._streams.items()
        ]

    def _do(self, work: Work, keys: list[str]) -> None:
        streams = [self._streams[k] for k in keys]
        try:
            if work is Work.TALKER_STEP:
                codes = self.talker.step([s.seq for s in streams])
                for stream, code in zip(streams, codes, strict=True):
                    if code is not None:
                        stream.audio.push([code])
                    self._after_talker(stream)
                self._admit()
            else:
                chunks = self.code2wav.decode([s.audio for s in streams])
                now = self._now()
                for key, stream, samples in zip(keys, streams, chunks, strict=True):
                    if len(samples):
                        stream.sink(AudioChunk(stream.clock.samples_sent, samples))
                        stream.clock.sent(len(samples), now)
                    self._finish_if_done(key, stream)
        except Exception as error:
            log.exception("speech %s failed for %s", work.name, keys)
            for key in keys:
                self._fail(key, error)

    def _after_talker(self, stream: _Stream) -> None:
        if stream.seq.finished and not stream.audio.finished:
            stream.audio.finish()
            self._finish_if_done(stream.seq.request_id, stream)

    def _finish_if_done(self, key: str, stream: _Stream) -> None:
        if stream.audio.done:
            self._drop(key)  # before telling anyone, so that a finished stream is never still counted
            stream.sink(SpeechDone(len(stream.seq.codes), stream.seq.finish_reason or "stop"))

    def _fail(self, key: str, error: Exception) -> None:
        stream = self._streams.get(key)
        if stream is not None:
            self._drop(key)
            stream.sink(SpeechFailed(error))

    def _drop(self, key: str) -> None:
        stream = self._streams.pop(key, None)
        if stream is not None:
            self.talker.free(stream.seq)
            self._admit()
