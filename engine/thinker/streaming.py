"""Streaming input: a user turn's thinker request prefilled while the user still speaks (vLLM's resumable requests).

`ThinkerIngest` feeds `AsyncLLM.generate` an async generator of `StreamingInput` chunks: first the conversation
so far up to the new audio's `<|audio_bos|>` (earlier turns' media included), then the complete 2 s blocks of the
new audio as they arrive (precomputed features, `features.BlockFeatures`, one audio item per block), and at
`finish` the rest of the audio and of the chat template with the turn's real sampling. Every chunk but the last
samples one greedy token, which vLLM discards; the KV, the rows the tap streams and the TMRoPE positions
(recomputed by the runner over the grown prompt) carry on, so the answer is that of the whole conversation sent at
once.

One chunk is in flight at a time: vLLM merges the outputs of a request that the consumer has not read yet, so
two chunks' completions (or the last block's discarded token and the answer's first) could arrive as one.
Blocks that arrive meanwhile wait here and travel together in the next chunk.

Whisper clamps every block at the whole clip's maximum, which a later, louder block can raise. When it raises it
enough to change a block already sent (`BlockFeatures.changed`), the session is restarted while the user still
speaks: aborted, and a new one (its own id in vLLM and the tap, so nothing of the old one can reach it) sent the
head again and every complete block clamped at the new maximum. Where the answer could still differ (stop
strings, which vLLM refuses for streaming input; structured outputs; the last partial block moving a sent block's
clamp) `finish` answers the conversation sent at once instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from omnitalk.engine.request import Audio, Message, ThinkerRequest
from omnitalk.engine.thinker.ahead import AheadFeed, ObservedQueue, TalkerAhead
from omnitalk.engine.thinker.chunks import audio_chunk, prefill_params, same_messages, turn_prompt
from omnitalk.engine.thinker.conversation import AUDIO_PLACEHOLDER, Recorder, SessionRows
from omnitalk.engine.thinker.engine import (
    ThinkerEngine,
    ThinkerInputError,
    _classify,
    _sampling_params,
)
from omnitalk.engine.thinker.events import ThinkerDone, ThinkerEvent, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.features import HOP, BlockFeatures, clamp, clip_log_mel, split_blocks
from omnitalk.engine.thinker.ordering import fail, leading_rows, ordered
from omnitalk.engine.thinker.prompt import PromptError, audio_token_count
from omnitalk.engine.thinker.session_request import keys_of, processed, put_covered

__all__ = ["AUDIO_PLACEHOLDER", "IngestListener", "ThinkerIngest", "audio_chunk", "prefill_params"]


class IngestListener(Protocol):
    """Told of an ingest's progress as it happens (the server's metrics)."""

    def prefilled(self, blocks: int) -> None:
        """`blocks` more blocks are held prefilled in a session (negative: a session ended and let them go)."""

    def restarted(self) -> None:
        """A session was replaced by a new one (a later block moved the clamp of a block it held)."""


@dataclass(eq=False)
class _Session:
    """One vLLM streaming-input request of the turn; a restart replaces it with another under a new key."""

    key: str
    queue: asyncio.Queue  # the events and rows `finish` streams
    inputs: asyncio.Queue = field(default_factory=asyncio.Queue)  # StreamingInput chunks; None ends the request
    pump: asyncio.Task | None = None
    in_flight: int | None = None  # blocks in the chunk being prefilled (0: the head), None: idle
    sent: int = 0  # blocks sent, those in flight included
    done: int = 0  # blocks whose chunk vLLM reported prefilled
    final_sent: bool = False
    # A session-salted ingest's content keys and token ids of every position sent so far (keys None: salted alone,
    # nothing recorded), the leading positions whose rows the stream holds already, and what vLLM served from its
    # cache.
    keys: list[bytes] | None = None
    ids: list[int] = field(default_factory=list)
    covered: int = 0
    cached: int = 0
    feed: AheadFeed | None = None  # its prompt's rows to the talker as they arrive (prefilled ahead)


class ThinkerIngest:
    """One user turn of audio, prefilled into the thinker block by block before the turn ends.

    `history` is the conversation before the new user message, which holds the audio only. `start` once, then
    `push_audio` any number of times, then `finish(request)` once, or `close` at any time (idempotent; `finish`
    closes on its own when its stream ends or is left).
    """

    def __init__(self, engine: ThinkerEngine, request_id: str, history: tuple[Message, ...], *,
                 hidden_states: bool, listener: IngestListener | None = None, session: str | None = None,
                 talker: TalkerAhead | None = None):  # fmt: skip
        self._engine = engine
        # `talker`: where a session-salted ingest's prompt rows go as they arrive, prefilled ahead into the talker's
        # cache of the session's prompt blocks (the speech engine); None: the talker prefills them with the answer.
        self._talker = talker
        # `session`: the Realtime session whose state the turn reuses and extends (`ThinkerRequest.session`); its
        # salt, its stored rows in front, its content keys recorded, its rows stored at the answer's end.
        self._salt = session if hidden_states else None
        self._head_rows: SessionRows | None = None  # a replaced session's rows of the head, for the next one
        # The head's content keys, computed by the first session that sent it: every restart sends the same head
        # under the same salt, so processing it again (the whole history's items hashed) would give the same keys.
        self._head_keys: list[bytes] | None = None
        self._head_ids: list[int] = []
        self.request_id = request_id
        self._history = history
        self._hidden = hidden_states
        self._listener = listener
        config = engine.llm.model_config.hf_config
        self._num_mels = getattr(config, "thinker_config", config).audio_config.num_mel_bins
        self._audio_token = engine.tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER)
        self._blocks = BlockFeatures(self._num_mels)
        self._head: dict[str, Any] = {}
        self._tail: list[int] = []
        self._session: _Session | None = None
        self._ending: set[asyncio.Task] = set()  # aborts of replaced sessions, awaited by `close`
        self._progress = asyncio.Condition()
        self._closed = False
        self._finishing = False
        self._uncovered = False
        self.restarts = 0  # sessions replaced because a later block moved the clamp
        self.fallback: str | None = None  # why `finish` answered the conversation sent at once; None: it did not

    @property
    def prefilled_blocks(self) -> int:
        """Blocks of the new audio whose prefill vLLM has reported complete in the current session."""
        return self._session.done if self._session is not None else 0

    @property
    def pushed_blocks(self) -> int:
        """Complete blocks of the new audio received so far."""
        return self._blocks.num_blocks

    @property
    def ahead_positions(self) -> int:
        """Leading prompt positions of the current session handed to the talker to prefill ahead (0: none)."""
        feed = self._session.feed if self._session is not None else None
        return feed.num_passed_on if feed is not None else 0

    def _key(self, restart: int) -> str:
        """The session's own id in vLLM and the tap, one per restart: rows and outputs of an aborted session
        reach neither its successor nor a request that `finish` may send under `request_id`."""
        return f"{self.request_id}#ingest{restart}"

    async def start(self) -> None:
        """Renders the conversation up to the new audio and submits it; ThinkerInputError if it cannot be."""
        prefix = self._key(0).removesuffix("0")
        if any(key.startswith(prefix) for key in self._engine._streams):
            raise ThinkerInputError(f"request id {self.request_id!r} is already running")
        try:
            clips = self._engine.sessions.clip_items(self._salt) if self._salt is not None else None
            self._head, self._tail = await asyncio.to_thread(
                turn_prompt, self._history, self._engine.tokenizer, self._audio_token, clips
            )
        except PromptError as error:
            await self.close()
            raise ThinkerInputError(str(error)) from error
        media = self._head.get("multi_modal_data", {})
        if set(media) - {"audio"} or isinstance(media.get("audio"), list):
            # Media other than block items pass vLLM's processor cache, which takes an item processed once as sent
            # to the EngineCore: chunks are processed once for their keys and again by vLLM, so only block items
            # (which bypass that cache) may be. The turn is ingested salted alone instead.
            self._salt = None
        if not self._closed:
            self._open_session()

    def _open_session(self) -> None:
        """Submits a new session: the head, then (as soon as it is prefilled) every complete block so far."""
        engine = self._engine
        key, size = self._key(self.restarts), 2 * engine.max_model_len + 4
        if self._salt is not None and self._hidden and self._talker is not None:
            feed = AheadFeed(self._talker, key, self._salt)
            session = _Session(key, ObservedQueue(size, feed.observe), feed=feed)
        else:
            session = _Session(key, asyncio.Queue(maxsize=size))
        session.keys = [] if self._salt is not None else None
        engine._streams[session.key] = session.queue
        if self._hidden:
            engine._tapped.add(session.key)
            engine._ensure_receiver()
        self._session = session
        # Salted alone, each session has its own salt: positions cached from an aborted session would never be
        # recomputed, so have no rows. Salted by the Realtime session, the cache serves what the session's stored
        # rows (or a replaced session's, `_restart`) cover; more is an uncovered hit (`_run`).
        self._send(session, {**self._head, "cache_salt": self._salt or session.key}, blocks=0)
        session.pump = asyncio.create_task(self._run(session))

    def push_audio(self, samples: np.ndarray) -> None:
        """Adds 16 kHz float32 samples of the new audio; every block they complete is prefilled as soon as the
        chunk before it is, or, if it moved the clamp of a block already sent, in a new session."""
        if self._closed or self._finishing:
            return
        peak = self._blocks.peak
        if not self._blocks.append(samples):
            return
        session = self._session
        if session is not None and self._blocks.changed(session.sent, peak, self._blocks.peak):
            self._restart(session)
        else:
            self._send_blocks()

    def _restart(self, old: _Session) -> None:
        head = self._head_keys
        if old.keys and head:  # the cache now holds the head under the session's salt: keep its rows
            rows = leading_rows(old.queue, len(head))
            if rows is not None and len(rows) > old.covered:
                self._head_rows = SessionRows(head[: len(rows)], rows)
        self.restarts += 1
        self._end_session(old)
        self._open_session()
        if self._listener is not None:
            self._listener.restarted()

    def _send_blocks(self) -> None:
        """Sends every complete block not yet sent as one chunk, if none is in flight."""
        session = self._session
        if session is None or session.in_flight is not None or self._finishing or self._closed:
            return
        items = [self._blocks.block(k) for k in range(session.sent, self._blocks.num_blocks)]
        if items:
            self._send(session, audio_chunk(self._audio_token, items, []), blocks=len(items))

    def _send(self, session: _Session, prompt: dict[str, Any], *, blocks: int, sampling=None) -> None:
        from vllm.engine.protocol import StreamingInput

        session.in_flight = blocks
        session.sent += blocks
        session.inputs.put_nowait(StreamingInput(prompt, sampling))

    async def wait_prefilled(self, blocks: int) -> None:
        """Returns once `blocks` blocks are prefilled in the current session, or the session has ended."""
        await self._wait_for(lambda: self.prefilled_blocks >= blocks)

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        def ended() -> bool:
            session = self._session
            return session is None or session.pump is None or session.pump.done()

        async with self._progress:
            await self._progress.wait_for(lambda: predicate() or ended())

    async def finish(self, request: ThinkerRequest) -> AsyncIterator[ThinkerEvent]:
        """Streams what `ThinkerEngine.generate(request)` would: from the session when `request` is the history
        plus a user message of the audio pushed (and wants rows as the session does), else from `request` sent
        at once under its own id."""
        self._finishing = True
        log_spec, maximum = await asyncio.to_thread(clip_log_mel, self._blocks.samples, self._num_mels)
        await self._wait_for(lambda: self._session is None or self._session.in_flight is None)
        self.fallback = self._fallback(request, log_spec.shape[1], maximum)
        if self.fallback is not None:
            await self.close()
            async for event in self._engine.generate(request):
                yield event
            return
        session = self._session
        assert session is not None
        items = split_blocks(clamp(log_spec, maximum))
        self._send_last(session, items, request)
        recorder = None
        if session.keys is not None:
            recorder = Recorder()
            # Later turns send this clip as the very items sent here (those sent earlier are equal: no clamp moved).
            self._engine.sessions.clip_items(self._salt).put(request.messages[-1].content[0].samples, items)
        try:
            async for event in ordered(session.queue, self._hidden):
                if isinstance(event, ThinkerStart) and session.feed is not None:
                    session.feed.stop()  # the answer opens in the talker next: it prefills the rest itself
                if recorder is not None:
                    recorder.add(event)
                    if isinstance(event, ThinkerDone):
                        recorder.keys = session.keys or []
                        recorder.store(self._engine.sessions, self._salt)
                yield event
        finally:
            await self.close()

    def _fallback(self, request: ThinkerRequest, frames: int, maximum: float) -> str | None:
        session = self._session
        if self._uncovered:
            return "the cache served more than the session's rows cover"
        if self._closed or session is None or session.pump is None or session.pump.done():
            return "the session ended before the turn"
        turn = Message("user", (Audio(self._blocks.samples),))
        same = request.hidden_states == self._hidden and not request.use_audio_in_video
        same = same and self._salt in (None, self._engine._session_of(request))
        if not same or not same_messages(request.messages, (*self._history, turn)):
            return "the conversation is not the one ingested"
        if request.sampling.stop:
            return "stop strings"  # vLLM refuses them on streaming input
        if request.sampling.json_schema is not None:
            return "structured output"  # a grammar set on a session's last chunk is not what vLLM tests
        if audio_token_count(frames * HOP) == 0:
            return "no audio"  # too short for one token: the request sent at once says so in its error
        if self._blocks.changed(session.sent, self._blocks.peak, maximum):
            return "the last block moved the clamp"  # a restart now would cost what sending it at once does
        return None

    def _send_last(self, session: _Session, items: list[torch.Tensor], request: ThinkerRequest) -> None:
        """The blocks not yet sent and the rest, as one item each, then the chat template, with the real sampling."""
        rest = items[session.sent :]
        prompt = audio_chunk(self._audio_token, rest, self._tail) if rest else {"prompt_token_ids": list(self._tail)}
        tapped = ThinkerRequest(session.key, request.messages, request.sampling, hidden_states=self._hidden)
        session.final_sent = True
        if session.feed is not None:
            session.feed.seal()  # the last chunk's rows are the answer's prefill
        self._send(session, prompt, blocks=0, sampling=_sampling_params(tapped))
        session.inputs.put_nowait(None)

    async def _chunks(self, session: _Session):
        """The session's chunks as they are sent; a session-salted one's are processed first (as `_submit` does)
        for their content keys, and the head's covered rows go into the stream before vLLM sees it."""
        while (item := await session.inputs.get()) is not None:
            if session.keys is not None:
                first = not session.keys
                await self._keys(session, item.prompt)
                if session.feed is not None:
                    session.feed.known(session.ids, session.keys)
                if first:
                    stored = self._head_rows or self._engine.sessions.get(self._salt)
                    session.covered = put_covered(stored, session.keys, session.queue)
            yield item

    async def _keys(self, session: _Session, prompt: dict[str, Any]) -> None:
        """`session.keys` and `session.ids` continued by the chunk `prompt`'s (the head's: computed once per turn)."""
        if not session.keys and self._head_keys is not None:
            session.keys, session.ids = self._head_keys, list(self._head_ids)
            return
        core = await processed(self._engine.llm, session.key, prompt, prefill_params(None))
        keys = keys_of(core, session.keys)
        if not session.keys:
            self._head_keys, self._head_ids = keys, list(core.prompt_token_ids or ())
        session.keys = keys
        session.ids += core.prompt_token_ids or ()

    async def _run(self, session: _Session) -> None:
        queue = session.queue
        generated = 0
        started = False
        first = True
        try:
            params = prefill_params(session.key if self._hidden else None)
            async for output in self._engine.llm.generate(self._chunks(session), params, session.key):
                completion = output.outputs[0]
                if first:
                    first, session.cached = False, output.num_cached_tokens or 0
                    if session.keys is not None and session.cached > session.covered:
                        self._uncovered = True  # positions cached with no row anywhere: `finish` falls back
                        return
                if not session.final_sent:
                    if completion.finish_reason is not None:  # an intermediate chunk is prefilled
                        await self._chunk_done(session)
                    continue
                if not started:
                    ids = list(output.prompt_token_ids or ())
                    keys = tuple(session.keys) if session.keys is not None and len(session.keys) == len(ids) else None
                    queue.put_nowait(ThinkerStart(ids, content_keys=keys))
                    started = True
                generated += len(completion.token_ids)
                queue.put_nowait(ThinkerText(list(completion.token_ids), completion.text))
                if completion.finish_reason is not None:
                    prompt_len = len(output.prompt_token_ids or ())
                    queue.put_nowait(ThinkerDone(completion.finish_reason, prompt_len, generated, session.cached))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            fail(queue, _classify(error))
        finally:
            async with self._progress:
                self._progress.notify_all()

    async def _chunk_done(self, session: _Session) -> None:
        blocks = session.in_flight or 0
        async with self._progress:
            session.done += blocks
            session.in_flight = None
            self._progress.notify_all()
        if blocks and self._listener is not None:
            self._listener.prefilled(blocks)
        self._send_blocks()

    def _end_session(self, session: _Session) -> None:
        """Drops the session's streams at once (late rows and outputs find no queue) and aborts it in vLLM."""
        self._engine._streams.pop(session.key, None)
        self._engine._tapped.discard(session.key)
        session.inputs.put_nowait(None)
        if session.feed is not None:
            session.feed.stop()
        if session.pump is not None:
            session.pump.cancel()
        if session.done and self._listener is not None:
            self._listener.prefilled(-session.done)
        abort = asyncio.create_task(self._abort(session))
        self._ending.add(abort)
        abort.add_done_callback(self._ending.discard)

    async def _abort(self, session: _Session) -> None:
        if session.pump is not None:
            await asyncio.gather(session.pump, return_exceptions=True)
        await self._engine.abort(session.key)

    async def close(self) -> None:
        """Aborts the session in vLLM and drops its rows; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._session is not None:
            self._end_session(self._session)
        await asyncio.gather(*list(self._ending), return_exceptions=True)
