"""Streaming input: a user turn's thinker request prefilled while the user still speaks (vLLM's resumable requests).

`ThinkerIngest` feeds `AsyncLLM.generate` an async generator of `StreamingInput` chunks: first the conversation
so far up to the new audio's `<|audio_bos|>` (earlier turns' media included), then one chunk per complete 2 s
block of the new audio (precomputed features, `features.BlockFeatures`), and at `finish` the rest of the audio
and of the chat template with the turn's real sampling. Every chunk but the last samples one greedy token, which
vLLM discards; the KV, the rows the tap streams and the TMRoPE positions (recomputed by the runner over the grown
prompt) carry on, so the answer is that of the whole conversation sent at once.

One chunk is in flight at a time: vLLM merges the outputs of a request that the consumer has not read yet, so
two chunks' completions (or the last block's discarded token and the answer's first) could arrive as one.
Blocks that arrive meanwhile wait here; at `finish` they travel in the last chunk. Where the answer could differ
(stop strings, which vLLM refuses for streaming input; structured outputs; a block whose clamp the clip's later
maximum changed) `finish` answers the conversation sent at once instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import torch

from omnitalk.engine.request import Audio, Message, Text, ThinkerRequest
from omnitalk.engine.thinker import rows as wire
from omnitalk.engine.thinker.engine import (
    ThinkerEngine,
    ThinkerInputError,
    _classify,
    _fail,
    _ordered,
    _sampling_params,
)
from omnitalk.engine.thinker.events import ThinkerDone, ThinkerEvent, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.features import BLOCK_FRAMES, HOP, BlockFeatures, clip_features
from omnitalk.engine.thinker.prompt import PromptError, audio_feature_kwargs, audio_token_count, build_prompt

AUDIO_PLACEHOLDER = "<|AUDIO|>"


def audio_chunk(token_id: int, features: torch.Tensor, tail: list[int]) -> dict[str, Any]:
    """A prompt chunk of one audio item given as features [num_mels, frames] (float32), then `tail` ids. All three
    fields are needed: vLLM's input schema for Qwen2.5-Omni audio requires the mask beside the lengths, and a
    chunk without it fails inside the worker, which kills the EngineCore."""
    if features.ndim != 2 or features.dtype != torch.float32 or features.shape[1] == 0:
        raise ValueError(f"audio features must be [num_mels, frames] float32, got {tuple(features.shape)}")
    frames = features.shape[1]
    audio = {
        "input_audio_features": features.contiguous(),
        "audio_feature_lengths": torch.tensor([frames]),
        "feature_attention_mask": torch.ones((1, frames), dtype=torch.long),
    }
    return {"prompt_token_ids": [token_id, *tail], "multi_modal_data": {"audio": audio}}


def prefill_params(tap: str | None):
    """An intermediate chunk's sampling: greedy, one token (vLLM discards it), the tap on when rows are wanted."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra = {wire.TAP_KEY: tap} if tap is not None else None
    return SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.DELTA, extra_args=extra)


def same_messages(a: tuple[Message, ...], b: tuple[Message, ...]) -> bool:
    """Equal conversations: audio by its samples, images and videos by identity (they are the session's own)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.role != y.role or len(x.content) != len(y.content):
            return False
        for p, q in zip(x.content, y.content, strict=True):
            if type(p) is not type(q):
                return False
            if isinstance(p, Audio):
                if not np.array_equal(p.samples, q.samples):
                    return False
            elif isinstance(p, Text):
                if p != q:
                    return False
            elif p is not q:
                return False
    return True


class ThinkerIngest:
    """One user turn of audio, prefilled into the thinker block by block before the turn ends.

    `history` is the conversation before the new user message, which holds the audio only. `start` once, then
    `push_audio` any number of times, then `finish(request)` once, or `close` at any time (idempotent; `finish`
    closes on its own when its stream ends or is left).
    """

    def __init__(self, engine: ThinkerEngine, request_id: str, history: tuple[Message, ...], *, hidden_states: bool):
        self._engine = engine
        self.request_id = request_id
        # The session's own id in vLLM and the tap: rows of an aborted session never reach a request that
        # `finish` may send under `request_id`.
        self._key = f"{request_id}#ingest"
        self._history = history
        self._hidden = hidden_states
        config = engine.llm.model_config.hf_config
        self._num_mels = getattr(config, "thinker_config", config).audio_config.num_mel_bins
        self._audio_token = engine.tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER)
        self._blocks = BlockFeatures(self._num_mels)
        self._pending: list[torch.Tensor] = []  # complete blocks not yet sent
        self._inputs: asyncio.Queue = asyncio.Queue()
        self._queue: asyncio.Queue | None = None
        self._pump: asyncio.Task | None = None
        self._tail: list[int] = []
        self._in_flight: int | None = None  # blocks in the chunk being prefilled (0: the head), None: idle
        self._final_sent = False
        self._blocks_done = 0
        self._progress = asyncio.Condition()
        self._closed = False
        self._finishing = False
        self.fallback: str | None = None  # why `finish` answered the conversation sent at once; None: it did not

    @property
    def prefilled_blocks(self) -> int:
        """Blocks of the new audio whose prefill vLLM has reported complete."""
        return self._blocks_done

    @property
    def pushed_blocks(self) -> int:
        """Complete blocks of the new audio received so far."""
        return self._blocks.num_blocks

    async def start(self) -> None:
        """Renders the conversation up to the new audio and submits it; ThinkerInputError if it cannot be."""
        engine = self._engine
        if self._key in engine._streams:
            raise ThinkerInputError(f"request id {self.request_id!r} is already running")
        self._queue = asyncio.Queue(maxsize=2 * engine.max_model_len + 4)
        engine._streams[self._key] = self._queue
        if self._hidden:
            engine._tapped.add(self._key)
        try:
            head, self._tail = await asyncio.to_thread(self._split_prompt)
        except PromptError as error:
            await self.close()
            raise ThinkerInputError(str(error)) from error
        if self._hidden:
            engine._ensure_receiver()
        self._send(head, blocks=0)
        self._pump = asyncio.create_task(self._run())

    def _split_prompt(self) -> tuple[dict[str, Any], list[int]]:
        """The conversation with a placeholder audio as the new turn, as (the head prompt, cut after the new
        turn's `<|audio_bos|>`; the ids after its `<|AUDIO|>`)."""
        turn = Message("user", (Audio(np.zeros(1, np.float32)),))
        prompt = build_prompt((*self._history, turn), self._engine.tokenizer, use_audio_in_video=False)
        encode = self._engine.tokenizer.encode
        if "prompt" in prompt:
            text = prompt["prompt"]
            cut = text.rindex(AUDIO_PLACEHOLDER)
            head: dict[str, Any] = {"prompt": text[:cut]}
            tail = encode(text[cut + len(AUDIO_PLACEHOLDER) :], add_special_tokens=False)
        else:
            ids = prompt["prompt_token_ids"]
            cut = len(ids) - 1 - ids[::-1].index(self._audio_token)
            head, tail = {"prompt_token_ids": ids[:cut]}, ids[cut + 1 :]
        head["cache_salt"] = self._key  # cached positions would never be recomputed: no rows
        audios = prompt["multi_modal_data"]["audio"][:-1]
        media = {k: v for k, v in prompt["multi_modal_data"].items() if k != "audio"}
        if audios:
            media["audio"] = audios
        if media:
            head["multi_modal_data"] = media
            head["mm_processor_kwargs"] = {"use_audio_in_video": False}
            if audios:
                head["mm_processor_kwargs"] |= audio_feature_kwargs([samples for samples, _ in audios])
        return head, tail

    def push_audio(self, samples: np.ndarray) -> None:
        """Adds 16 kHz float32 samples of the new audio; every block they complete is prefilled as soon as the
        chunk before it is."""
        if self._closed or self._finishing:
            return
        self._pending += self._blocks.append(samples)
        self._send_next_block()

    def _send_next_block(self) -> None:
        if self._in_flight is None and self._pending and not self._finishing and not self._closed:
            block = self._pending.pop(0)
            self._send(audio_chunk(self._audio_token, block, []), blocks=1)

    def _send(self, prompt: dict[str, Any], *, blocks: int, sampling=None) -> None:
        from vllm.engine.protocol import StreamingInput

        self._in_flight = blocks
        self._inputs.put_nowait(StreamingInput(prompt, sampling))

    async def wait_prefilled(self, blocks: int) -> None:
        """Returns once `blocks` blocks are prefilled, or the session has ended."""
        await self._wait_for(lambda: self._blocks_done >= blocks)

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: predicate() or self._pump is None or self._pump.done())

    async def finish(self, request: ThinkerRequest) -> AsyncIterator[ThinkerEvent]:
        """Streams what `ThinkerEngine.generate(request)` would: from the session when `request` is the history
        plus a user message of the audio pushed (and wants rows as the session does), else from `request` sent
        at once under its own id."""
        self._finishing = True
        features = clip_features(self._blocks.samples, self._num_mels)
        await self._wait_for(lambda: self._in_flight is None)
        self.fallback = self._fallback(request, features)
        if self.fallback is not None:
            await self.close()
            async for event in self._engine.generate(request):
                yield event
            return
        self._send_last(features, request)
        try:
            async for event in _ordered(self._queue, self._hidden):
                yield event
        finally:
            await self.close()

    def _fallback(self, request: ThinkerRequest, features: torch.Tensor) -> str | None:
        if self._closed or self._pump is None or self._pump.done():
            return "the session ended before the turn"
        turn = Message("user", (Audio(self._blocks.samples),))
        same = request.hidden_states == self._hidden and not request.use_audio_in_video
        if not same or not same_messages(request.messages, (*self._history, turn)):
            return "the conversation is not the one ingested"
        if request.sampling.stop:
            return "stop strings"  # vLLM refuses them on streaming input
        if request.sampling.json_schema is not None:
            return "structured output"  # a grammar set on a session's last chunk is not what vLLM tests
        if audio_token_count(features.shape[1] * HOP) == 0:
            return "no audio"  # too short for one token: the request sent at once says so in its error
        if not self._blocks.matches(features):
            return "a later block moved the clamp"
        return None

    def _send_last(self, features: torch.Tensor, request: ThinkerRequest) -> None:
        rest = features[:, self._blocks_done * BLOCK_FRAMES :]
        if rest.shape[1] and audio_token_count(rest.shape[1] * HOP) > 0:
            prompt = audio_chunk(self._audio_token, rest, self._tail)
        else:
            prompt = {"prompt_token_ids": list(self._tail)}
        tapped = ThinkerRequest(self._key, request.messages, request.sampling, hidden_states=self._hidden)
        self._final_sent = True
        self._send(prompt, blocks=0, sampling=_sampling_params(tapped))
        self._inputs.put_nowait(None)

    async def _chunks(self):
        while (item := await self._inputs.get()) is not None:
            yield item

    async def _run(self) -> None:
        queue = self._queue
        generated = 0
        started = False
        try:
            params = prefill_params(self._key if self._hidden else None)
            async for output in self._engine.llm.generate(self._chunks(), params, self._key):
                completion = output.outputs[0]
                if not self._final_sent:
                    if completion.finish_reason is not None:  # an intermediate chunk is prefilled
                        await self._chunk_done()
                    continue
                if not started:
                    queue.put_nowait(ThinkerStart(list(output.prompt_token_ids or ())))
                    started = True
                generated += len(completion.token_ids)
                queue.put_nowait(ThinkerText(list(completion.token_ids), completion.text))
                if completion.finish_reason is not None:
                    prompt_len = len(output.prompt_token_ids or ())
                    queue.put_nowait(ThinkerDone(completion.finish_reason, prompt_len, generated))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            _fail(queue, _classify(error))
        finally:
            async with self._progress:
                self._progress.notify_all()

    async def _chunk_done(self) -> None:
        async with self._progress:
            self._blocks_done += self._in_flight or 0
            self._in_flight = None
            self._progress.notify_all()
        self._send_next_block()

    def _release(self) -> None:
        self._closed = True
        self._engine._streams.pop(self._key, None)
        self._engine._tapped.discard(self._key)

    async def close(self) -> None:
        """Aborts the session in vLLM and drops its rows; idempotent."""
        if self._closed:
            return
        self._release()
        self._pending.clear()
        self._inputs.put_nowait(None)
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self._engine.abort(self._key)
