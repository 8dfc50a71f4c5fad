"""The engine the server uses: `async for event in engine.generate(request)` yields text, audio, usage, finish."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import torch

from omnitalk.engine.failure import EngineFailure
from omnitalk.engine.request import Message, Sampling, ThinkerRequest
from omnitalk.engine.speech.config import SpeechConfig
from omnitalk.engine.speech.engine import AudioChunk, SpeechDone, SpeechEngine, SpeechFailed
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.engine.thinker.config import ThinkerStartError, pin_v1_runner
from omnitalk.engine.thinker.engine import ThinkerConfig, ThinkerEngine, ThinkerInputError
from omnitalk.engine.thinker.events import HiddenStates, ThinkerDone, ThinkerEvent, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.streaming import IngestListener, ThinkerIngest

SAMPLE_RATE = 24_000


@dataclass(frozen=True, slots=True)
class Speech:
    """How to speak the answer: a voice of the checkpoint and the talker's sampling."""

    voice: str = "Chelsie"
    sampling: TalkerSampling = field(default_factory=TalkerSampling)
    # The talker says the text before the first of these tokens only (a tool call is written, never spoken).
    until: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class OmniRequest:
    request_id: str
    messages: tuple[Message, ...]
    sampling: Sampling = field(default_factory=Sampling)
    speech: Speech | None = None  # None: text only, the talker is skipped
    use_audio_in_video: bool = False
    session: str | None = None  # a conversation whose earlier turns' thinker state this request may reuse


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    token_ids: list[int]


@dataclass(frozen=True, slots=True)
class AudioDelta:
    offset: int  # sample index of samples[0] within the answer's audio
    samples: np.ndarray  # float32 mono at SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    text_tokens: int
    audio_tokens: int  # codec tokens, 50 per second of audio
    cached_tokens: int = 0  # prompt tokens the thinker served from its prefix cache


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str  # the thinker's: "stop" or "length"
    usage: Usage


OmniEvent = TextDelta | AudioDelta | Finished


@dataclass(frozen=True, slots=True)
class EngineConfig:
    thinker: ThinkerConfig
    speech: SpeechConfig = field(default_factory=SpeechConfig)


def check_startup(config: EngineConfig) -> None:
    """What can be refused before any engine process starts, each with a one-line ValueError: a missing
    checkpoint, a speech device or dtype this machine lacks, Code2Wav workers on a GPU, more GPUs than it has, an
    unsupported runner."""
    if not (config.thinker.model / "config.json").is_file():
        raise ValueError(f"{config.thinker.model} is not a Hugging Face checkpoint directory (no config.json)")
    config.speech.torch_dtype()  # resolves, and so checks, the device too
    config.speech.num_code2wav_workers()  # refuses workers for a speech stage on a GPU
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and (tp := config.thinker.tensor_parallel_size) > gpus:
        raise ValueError(f"tensor_parallel_size {tp} needs more GPUs than the {gpus} visible")
    try:
        pin_v1_runner()
    except ThinkerStartError as error:
        raise ValueError(str(error)) from None


class OmniEngine:
    """Thinker (vLLM) -> talker -> Code2Wav. Leaving a stream early cancels the request in every stage."""

    def __init__(self, thinker: ThinkerEngine, speech: SpeechEngine) -> None:
        self.thinker, self.speech = thinker, speech

    @classmethod
    def start(cls, config: EngineConfig) -> OmniEngine:
        thinker = ThinkerEngine(config.thinker)
        speech = SpeechEngine.from_checkpoint(config.thinker.model, config.speech, max_seq_len=thinker.max_model_len)
        return cls(thinker, speech)

    def shutdown(self) -> None:
        self.speech.shutdown()
        self.thinker.shutdown()

    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve (a stage is dead and will not come back in this process), or None."""
        return self.thinker.failure or self.speech.failure

    @property
    def voices(self) -> list[str]:
        return self.speech.voices

    def forget_session(self, session: str) -> None:
        """The session ended: its thinker rows and its talker's cached prompt blocks are dropped."""
        self.thinker.forget_session(session)
        self.speech.forget_session(session)

    def ingest(self, request_id: str, history: tuple[Message, ...], *, hidden_states: bool, session: str | None,
               listener: IngestListener | None = None) -> ThinkerIngest:  # fmt: skip
        """A user turn to prefill while it is spoken, for `generate(request, ingest)`: into the thinker, and, for a
        spoken turn of a session (`hidden_states` and `session`), the talker's blocks of its prompt too."""
        return ThinkerIngest(self.thinker, request_id, history, hidden_states=hidden_states, listener=listener,
                             session=session, talker=self.speech)  # fmt: skip

    async def generate(self, request: OmniRequest, ingest: ThinkerIngest | None = None) -> AsyncIterator[OmniEvent]:
        """`ingest`: the request's last user turn, already prefilled (`ThinkerIngest.finish` answers the request
        the same way, from the session when the request is what it ingested). Closed when the stream ends; a
        stream never started runs nothing, so its caller closes the ingest itself."""
        if self.failure is not None:
            raise EngineFailure(self.failure)
        if request.speech is not None and request.speech.voice not in self.voices:
            raise ThinkerInputError(f"unknown voice {request.speech.voice!r}; available: {', '.join(self.voices)}")
        thinker_request = ThinkerRequest(
            request.request_id,
            request.messages,
            request.sampling,
            use_audio_in_video=request.use_audio_in_video,
            hidden_states=request.speech is not None,
            session=request.session,
        )
        thinker = ingest.finish(thinker_request) if ingest is not None else self.thinker.generate(thinker_request)
        if request.speech is None:
            events = self._text_only(thinker)
        else:
            events = self._spoken(request.request_id, thinker, request.speech, request.session)
        try:
            async for event in events:
                yield event
        finally:  # the speech feeder stops before the thinker's stream closes; an ingest never started is released
            await events.aclose()
            await thinker.aclose()
            if ingest is not None:
                await ingest.close()

    async def _text_only(self, thinker: AsyncIterator[ThinkerEvent]) -> AsyncIterator[OmniEvent]:
        async for event in thinker:
            if isinstance(event, ThinkerText):
                yield TextDelta(event.text, event.token_ids)
            elif isinstance(event, ThinkerDone):
                usage = Usage(event.num_prompt_tokens, event.num_generated_tokens, 0, event.num_cached_tokens)
                yield Finished(event.finish_reason, usage)

    async def _spoken(
        self, key: str, thinker: AsyncIterator[ThinkerEvent], speech: Speech, session: str | None
    ) -> AsyncIterator[OmniEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event: object) -> None:  # runs on the speech thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        feeder = asyncio.create_task(self._feed_speech(key, thinker, speech, session, sink))
        thinker_done: ThinkerDone | None = None
        speech_done: SpeechDone | None = None
        try:
            while thinker_done is None or speech_done is None:
                event = await events.get()
                match event:
                    case TextDelta():
                        yield event
                    case AudioChunk(offset, samples):
                        yield AudioDelta(offset, samples)
                    case ThinkerDone():
                        thinker_done = event
                    case SpeechDone():
                        speech_done = event
                    case SpeechFailed(error) | _FeedFailed(error):
                        raise error
            done, codes = thinker_done, speech_done.num_codes
            usage = Usage(done.num_prompt_tokens, done.num_generated_tokens, codes, done.num_cached_tokens)
            yield Finished(done.finish_reason, usage)
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            self.speech.close(key)

    async def _feed_speech(
        self, key: str, thinker: AsyncIterator[ThinkerEvent], speech: Speech, session: str | None, sink
    ) -> None:
        """Thinker events to the speech thread (rows, tokens) and to the client (text), as they come. A session's
        request passes its content keys on, so the talker reuses the session's cached prompt blocks."""
        gate = _SpeechGate(speech.until)
        try:
            async for event in thinker:
                match event:
                    case ThinkerStart(prompt_ids, positions, content_keys):
                        gate.prompt_len = len(prompt_ids)
                        args = (key, prompt_ids, positions, speech.voice, speech.sampling, sink)
                        self.speech.open(*args, session=session, content_keys=content_keys)
                    case HiddenStates():
                        gate.pending.append(event)
                    case ThinkerText(token_ids, text):
                        if spoken := gate.tokens(token_ids):
                            self.speech.add_tokens(key, spoken)
                        sink(TextDelta(text, token_ids))
                for rows in gate.rows():
                    self.speech.add_rows(key, rows.first_position, rows.rows)
                if isinstance(event, ThinkerDone):
                    self.speech.thinker_done(key)
                    sink(event)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            sink(_FeedFailed(error))


@dataclass(slots=True)
class _SpeechGate:
    """What the talker may read: tokens up to the first `until` token, which it takes as its end of text, and the
    rows of the tokens before it. A row is passed on only once its token's text is known: rows travel on another
    socket and can overtake it, and a row past the end would make the talker speak the stop token."""

    until: frozenset[int]
    prompt_len: int = 0
    num_tokens: int = 0  # tokens passed on
    stopped: bool = False
    pending: list[HiddenStates] = field(default_factory=list)

    def tokens(self, token_ids: list[int]) -> list[int]:
        if self.stopped:
            return []
        for i, token in enumerate(token_ids):
            if token in self.until:
                self.stopped = True
                token_ids = token_ids[: i + 1]
                break
        self.num_tokens += len(token_ids)
        return token_ids

    def rows(self) -> list[HiddenStates]:
        """The pending rows of positions the talker may read now; later ones stay pending (or are never read)."""
        limit = self.prompt_len + self.num_tokens - self.stopped
        ready, later = [], []
        for event in self.pending:
            n = max(0, min(len(event.rows), limit - event.first_position))
            if n:
                ready.append(HiddenStates(event.first_position, event.rows[:n]))
            if n < len(event.rows):
                later.append(HiddenStates(event.first_position + n, event.rows[n:]))
        self.pending = later if not self.stopped else []
        return ready


@dataclass(frozen=True, slots=True)
class _FeedFailed:
    error: Exception
