"""The speech thread: talker steps and Code2Wav chunks of every live stream on one device, by playback deadline."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from omnitalk.codecs.code2wav import Code2Wav, Offload
from omnitalk.codecs.streaming import Code2WavStream, StreamingConfig
from omnitalk.engine.failure import EngineFailure
from omnitalk.engine.speech.config import SpeechConfig
from omnitalk.engine.speech.policy import Candidate, Costs, PlaybackClock, Work, choose, talker_bound
from omnitalk.engine.talker.ahead import AheadPrompt, PromptPart
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


@dataclass(slots=True)
class SpeechStats:
    """What the speech thread has done so far (read by benchmarks; racy but never torn)."""

    talker_steps: int = 0
    code2wav_batches: int = 0
    code2wav_rows: int = 0
    code2wav_offloaded_rows: int = 0  # of code2wav_rows, those decoded in Code2Wav worker processes
    dit_calls: int = 0
    worst_talker_wait_s: float = 0.0  # longest a talker-bound stream (policy.talker_bound) waited for a step


COST_EMA = 0.3  # weight of the newest measurement in the predicted costs (Code2Wav per row, talker step)
# Talker blocks one idle round prefills ahead (32 positions each): the most a live stream's next step can wait on it.
AHEAD_BLOCKS_PER_ROUND = 4
# How often an otherwise idle speech thread looks for a Code2Wav worker's answer (the inbox wakes it sooner).
OFFLOAD_POLL_S = 0.002


def streaming_config(config: SpeechConfig) -> StreamingConfig:
    """Code2Wav's windows and solver from the speech settings."""
    return StreamingConfig.for_first_chunk(config.first_chunk_codes, solver=config.ode_solver)


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
    # "open", "rows", "tokens", "thinker_done", "close", "forget", "ahead", "cancel_ahead", "reset_stats", "stop"
    name: str
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
        self._waiting: list[str] = []  # opened, not yet in the talker (admitted by deadline, none overtaking)
        self._ahead: dict[str, AheadPrompt] = {}  # prompts being ingested, prefilled ahead in idle rounds
        self._offloads: list[tuple[Offload, list[str]]] = []  # Code2Wav rows decoding in workers, and their keys
        self._stats = SpeechStats()
        self._talker_wait_from: float | None = None  # since when a talker-bound stream waits for a step
        self._costs = Costs()  # predicted from measured batches and steps
        self._stopping = False
        self.num_failures = 0  # times the thread failed and restarted in place
        self._thread = threading.Thread(target=self._run, name="omnitalk-speech", daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: SpeechConfig, max_seq_len: int | None = None) -> SpeechEngine:
        """`max_seq_len` bounds each stream's prompt + 2 + codes: the thinker's context window (None: the
        talker's own, max_position_embeddings). The talker (weights and KV pool) and Code2Wav take the
        config's dtype."""
        device, dtype, workers = config.torch_device(), config.torch_dtype(), config.num_code2wav_workers()
        if (threads := config.num_threads()) is not None:
            torch.set_num_threads(threads)  # before the workers start: they take this process's count
        if device.type == "cuda":
            # fp32 matmuls and convolutions may use TF32 (10-bit mantissas, still finer than bf16); the
            # thinker runs in vLLM's own processes, which this does not touch.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        talker = Talker.from_checkpoint(
            path,
            device=device,
            dtype=dtype,
            max_seqs=config.max_streams,
            memory_gib=config.talker_memory_gib,
            max_seq_len=max_seq_len,
            enforce_eager=config.enforce_eager,
        )
        code2wav = Code2Wav.from_checkpoint(
            path, device=device, config=streaming_config(config), dtype=dtype, enforce_eager=config.enforce_eager
        )
        code2wav.start_workers(workers)
        return cls(talker, code2wav, max_batch=config.max_streams)

    @property
    def voices(self) -> list[str]:
        return sorted(self.talker.speakers)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def stats(self) -> SpeechStats:
        return replace(self._stats, dit_calls=self.code2wav.dit_calls)

    def reset_stats(self) -> None:
        """Starts the counts afresh (on the speech thread, after the commands sent before it)."""
        self._send("reset_stats")

    # Commands, callable from any thread.
    def open(
        self,
        key: str,
        prompt_ids: list[int],
        positions: torch.Tensor | None,
        voice: str,
        sampling: TalkerSampling,
        sink: Sink,
        session: str | None = None,
        content_keys: tuple[bytes, ...] | None = None,
    ) -> None:
        """Starts a stream; raises ValueError for an unknown voice. Audio noise is seeded like the talker. With a
        session and its prompt's content keys, the talker reuses (and caches) the session's prompt blocks."""
        if not self._thread.is_alive():
            raise EngineFailure("the speech thread is not running")
        if voice not in self.talker.speakers:
            raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.voices)}")
        seq = TalkerSequence(
            key, list(prompt_ids), voice, sampling, positions, session=session, content_keys=content_keys
        )
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

    def forget_session(self, session: str) -> None:
        """The session ended: the talker drops its cached prompt blocks, and nothing the engine holds caches any
        more under it (its prompts being prefilled ahead stop; its live streams' prompts are not cached)."""
        self._send("forget", session)

    def prefill_ahead(self, key: str, session: str, part: PromptPart) -> None:
        """More of a session's prompt that is being ingested under `key` (a Realtime turn before its request). The
        talker prefills its full blocks into the session's prefix cache in idle rounds (the lowest-priority work:
        never before a talker step or Code2Wav batch that can run), so the request's prefill finds them."""
        self._send("ahead", key, session, part)

    def cancel_ahead(self, key: str) -> None:
        """Idempotent: nothing more of `key`'s prompt is prefilled ahead; blocks already cached stay cached."""
        self._send("cancel_ahead", key)

    def shutdown(self) -> None:
        self._stopping = True
        self._send("stop")
        self._thread.join(timeout=10)
        self.code2wav.close()

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
        """One round: workers' audio and commands in, one batch of work out, else a few blocks prefilled ahead.
        True once told to stop."""
        self._collect(wait=False)
        work = self._choose()
        idle = work is None and self._next_ahead() is None
        commands = self._drain(block=idle, timeout=OFFLOAD_POLL_S if self._offloads else None)
        for command in commands:
            if command.name == "stop":
                return True
            self._apply(command)
        if commands:
            work = self._choose()  # the inputs changed
        if work is not None:
            self._do(*work)
        elif (ahead := self._next_ahead()) is not None:
            self._prefill_ahead(ahead)
        return False

    def _fail_all(self, error: Exception) -> None:
        streams, self._streams, self._waiting, self._ahead = self._streams, {}, [], {}
        self._collect(wait=True)  # frees the workers; the streams are gone, so their audio is dropped
        for stream in streams.values():
            try:
                self.talker.free(stream.seq)
            except Exception:
                log.exception("freeing the talker slot of %s failed", stream.seq.request_id)
            stream.sink(SpeechFailed(error))

    def _choose(self) -> tuple[Work, list[str]] | None:
        candidates, now = self._candidates(), self._now()
        if self._talker_wait_from is None and talker_bound(candidates):
            self._talker_wait_from = now
        waited = 0.0 if self._talker_wait_from is None else now - self._talker_wait_from
        return choose(candidates, self.max_batch, now, self._costs, waited)

    def _drain(self, block: bool, timeout: float | None = None) -> list[_Command]:
        commands = []
        if block:
            try:
                commands.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                return commands
        try:
            while True:
                commands.append(self._inbox.get_nowait())
        except queue.Empty:
            return commands

    def _apply(self, command: _Command) -> None:
        if command.name == "reset_stats":
            self._stats, self._talker_wait_from = SpeechStats(), None
            self.code2wav.dit_calls = 0
            return
        if command.name == "forget":
            self._forget(command.key)
            return
        if command.name in ("ahead", "cancel_ahead"):
            self._apply_ahead(command)
            return
        if command.name == "open":
            self._streams[command.key] = stream = command.args[0]
            try:
                self.talker.check(stream.seq)  # a stream that can never fit fails now, before any audio
            except ValueError as error:
                self._fail(command.key, error)
                return
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

    def _forget(self, session: str) -> None:
        self._ahead = {key: prompt for key, prompt in self._ahead.items() if prompt.session != session}
        for stream in self._streams.values():
            if stream.seq.session == session:
                stream.seq.session = None  # its prefill, still to come, would register blocks nobody could forget
        self.talker.forget(session)

    def _apply_ahead(self, command: _Command) -> None:
        if command.name == "cancel_ahead":
            self._ahead.pop(command.key, None)
            return
        session, part = command.args
        prompt = self._ahead.setdefault(command.key, AheadPrompt(command.key, session))
        try:
            prompt.extend(part)
        except ValueError:  # a stream with a gap: its prompt is not prefilled ahead (its request prefills it)
            log.exception("prefilling %s ahead stopped", command.key)
            del self._ahead[command.key]

    def _next_ahead(self) -> AheadPrompt | None:
        """The oldest prompt with full blocks not yet prefilled ahead."""
        block_size = self.talker.blocks.block_size
        return next((p for p in self._ahead.values() if p.num_done < p.num_blocks(block_size)), None)

    def _prefill_ahead(self, prompt: AheadPrompt) -> None:
        try:
            self.talker.prefill_ahead(prompt, AHEAD_BLOCKS_PER_ROUND)
        except Exception:  # only speed is lost: the request prefills what is not cached
            log.exception("prefilling %s ahead failed", prompt.request_id)
            del self._ahead[prompt.request_id]

    def _admit(self) -> None:
        """The most urgent waiting stream goes first once the pool can take its worst case; the ones behind
        it wait too, so a long stream is never overtaken for ever by short ones."""
        self._waiting = sorted((k for k in self._waiting if k in self._streams), key=self._deadline)
        while self._waiting and self.talker.can_add(self._streams[self._waiting[0]].seq):
            key = self._waiting.pop(0)
            try:
                self.talker.add(self._streams[key].seq)
            except ValueError as error:  # checked at open; kept so that no stream can stall the queue
                self._fail(key, error)

    def _deadline(self, key: str) -> float:
        return self._streams[key].clock.deadline()

    def _candidates(self) -> list[Candidate]:
        return [
            Candidate(
                key,
                s.clock.deadline(),
                talker_ready=s.seq.slot is not None and s.seq.ready,
                code2wav_ready=self.code2wav.ready(s.audio),
                playing=s.clock.first_audio_at is not None,
                codes_needed=self.code2wav.codes_needed(s.audio),
            )
            for key, s in self._streams.items()
        ]

    def _do(self, work: Work, keys: list[str]) -> None:
        streams = [self._streams[k] for k in keys]
        try:
            started = self._now()
            if work is Work.TALKER_STEP:
                self._count_talker_step(started)
                codes = self.talker.step([s.seq for s in streams])
                self._costs = replace(self._costs, talker_step_s=_ema(self._costs.talker_step_s, self._now() - started))
                for stream, code in zip(streams, codes, strict=True):
                    if code is not None:
                        stream.audio.push([code])
                    self._after_talker(stream)
                self._admit()
            else:
                chunks, offloads = self.code2wav.start_decode([s.audio for s in streams])
                now = self._now()
                offloaded = {i for offload in offloads for i in offload.indices}
                self._count_code2wav(len(keys), len(keys) - len(offloaded), now - started)
                self._offloads += [(offload, [keys[i] for i in offload.indices]) for offload in offloads]
                rows = zip(keys, streams, chunks, strict=True)
                self._send_audio([row for i, row in enumerate(rows) if i not in offloaded])
        except Exception as error:
            log.exception("speech %s failed for %s", work.name, keys)
            for key in keys:
                self._fail(key, error)

    def _collect(self, wait: bool) -> None:
        """The audio of the Code2Wav rows whose workers have answered (of all of them, waiting, with `wait`)."""
        pending, self._offloads = self._offloads, []
        for offload, keys in pending:
            if not (wait or offload.ready):
                self._offloads.append((offload, keys))
                continue
            try:
                chunks = self.code2wav.collect(offload)
            except Exception as error:
                log.exception("a Code2Wav worker failed for %s", keys)
                for key in keys:
                    self._fail(key, error)
                continue
            rows = [(key, self._streams.get(key), chunk) for key, chunk in zip(keys, chunks, strict=True)]
            self._send_audio([(k, s, c) for k, s, c in rows if s is not None])  # closed meanwhile: dropped

    def _send_audio(self, chunks: list[tuple[str, _Stream, np.ndarray]]) -> None:
        now = self._now()
        for key, stream, samples in chunks:
            if len(samples):
                stream.sink(AudioChunk(stream.clock.samples_sent, samples))
                stream.clock.sent(len(samples), now)
            self._finish_if_done(key, stream)

    def _count_talker_step(self, now: float) -> None:
        if self._talker_wait_from is not None:
            wait = now - self._talker_wait_from
            self._stats.worst_talker_wait_s = max(self._stats.worst_talker_wait_s, wait)
            self._talker_wait_from = None
        self._stats.talker_steps += 1

    def _count_code2wav(self, rows: int, thread_rows: int, seconds: float) -> None:
        """A batch of `rows`, `thread_rows` of them decoded in this thread in `seconds` (the others in workers)."""
        self._stats.code2wav_batches += 1
        self._stats.code2wav_rows += rows
        self._stats.code2wav_offloaded_rows += rows - thread_rows
        if thread_rows:  # the talker's pause per row this thread decodes (it waits for no worker)
            row_s = _ema(self._costs.code2wav_row_s, seconds / thread_rows)
            self._costs = replace(self._costs, code2wav_row_s=row_s)

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


def _ema(previous: float, value: float) -> float:
    return value if previous == 0 else previous + COST_EMA * (value - previous)
