"""The thinker engine: vLLM's AsyncLLM plus the hidden-state rows its worker publishes, merged per request."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq
import zmq.asyncio
from vllm.exceptions import VLLMClientError
from vllm.v1.engine.exceptions import EngineGenerateError

from omnitalk.engine.request import Sampling, ThinkerRequest
from omnitalk.engine.thinker import rows as wire
from omnitalk.engine.thinker.events import HiddenStates, ThinkerDone, ThinkerEvent, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.prompt import PromptError, build_prompt

log = logging.getLogger(__name__)
WORKER_CLS = "omnitalk.engine.thinker.tap.HiddenStateWorker"


@dataclass(frozen=True, slots=True)
class ThinkerConfig:
    model: Path
    max_model_len: int | None = None  # None: the checkpoint's
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # chunked-prefill token budget per step; None: vLLM's default
    gpu_memory_utilization: float | None = None  # None: 0.25 on CPU (a share of RAM there), 0.6 on GPU
    dtype: str = "auto"
    enable_prefix_caching: bool = False
    seed: int = 0


class ThinkerInputError(ValueError):
    """The request cannot be served as given (bad conversation, too long for the context window, ...)."""


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True, slots=True)
class _Positions:
    positions: torch.Tensor


class ThinkerEngine:
    """`generate(request)` streams ThinkerEvents; leaving the stream early aborts the request in vLLM."""

    def __init__(self, config: ThinkerConfig) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self._address = f"ipc://{tempfile.gettempdir()}/omnitalk-rows-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self._socket.bind(self._address)
        memory = config.gpu_memory_utilization or (0.25 if current_platform.is_cpu() else 0.6)
        args = AsyncEngineArgs(
            model=str(config.model),
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_chunked_prefill=True,
            enable_prefix_caching=config.enable_prefix_caching,
            gpu_memory_utilization=memory,
            seed=config.seed,
            worker_cls=WORKER_CLS,
            additional_config={wire.ADDRESS_KEY: self._address},
        )
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.max_model_len = self.llm.model_config.max_model_len
        self._streams: dict[str, asyncio.Queue] = {}
        self._receiver: asyncio.Task | None = None

    def shutdown(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        self.llm.shutdown()
        self._socket.close(linger=0)

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    async def generate(self, request: ThinkerRequest) -> AsyncIterator[ThinkerEvent]:
        if request.request_id in self._streams:
            raise ThinkerInputError(f"request id {request.request_id!r} is already running")
        try:
            prompt = build_prompt(request.messages, self.tokenizer, use_audio_in_video=request.use_audio_in_video)
        except PromptError as error:
            raise ThinkerInputError(str(error)) from error
        if request.hidden_states:
            prompt["cache_salt"] = request.request_id  # cached positions would never be recomputed: no rows
            self._ensure_receiver()
        # Bounded by construction: at most one text and one rows item per engine step and position.
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * self.max_model_len + 4)
        self._streams[request.request_id] = queue
        producer = asyncio.create_task(self._pump(request, prompt, queue))
        done = False
        try:
            async for event in _ordered(queue, request.hidden_states):
                done = isinstance(event, ThinkerDone)
                yield event
        finally:
            self._streams.pop(request.request_id, None)
            producer.cancel()
            if not done:
                await self.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        """Idempotent: unknown or finished ids are ignored."""
        await self.llm.abort(request_id)

    async def _pump(self, request: ThinkerRequest, prompt: dict, queue: asyncio.Queue) -> None:
        params = _sampling_params(request)
        generated = 0
        started = False
        try:
            async for output in self.llm.generate(prompt, params, request.request_id):
                if not started:
                    queue.put_nowait(ThinkerStart(list(output.prompt_token_ids or ())))
                    started = True
                completion = output.outputs[0]
                generated += len(completion.token_ids)
                queue.put_nowait(ThinkerText(list(completion.token_ids), completion.text))
                if output.finished:
                    prompt_len = len(output.prompt_token_ids or ())
                    queue.put_nowait(ThinkerDone(completion.finish_reason or "stop", prompt_len, generated))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            queue.put_nowait(_Failed(_classify(error)))

    def _ensure_receiver(self) -> None:
        if self._receiver is None or self._receiver.done():
            self._receiver = asyncio.create_task(self._receive_rows())

    async def _receive_rows(self) -> None:
        while True:
            spans, prompts = wire.decode(await self._socket.recv_multipart())
            items = [(k, _Positions(p)) for k, p in prompts.items()]
            items += [(span.stream_id, HiddenStates(span.first_position, rows)) for span, rows in spans]
            for stream_id, item in items:
                queue = self._streams.get(stream_id)
                if queue is None:
                    continue  # aborted or finished: late rows are dropped
                try:
                    queue.put_nowait(item)
                except asyncio.QueueFull:
                    log.error("hidden-state queue of %s overflowed; closing it", stream_id)
                    self._streams.pop(stream_id, None)


async def _ordered(queue: asyncio.Queue, with_rows: bool) -> AsyncIterator[ThinkerEvent]:
    """ThinkerStart first (with the prompt's positions when rows are wanted); rows once per position, in
    order; ThinkerDone last, after every row is out. Rows and positions travel on another socket than
    the tokens, so either may come first: everything waits until the start can be announced."""
    start: ThinkerStart | None = None
    positions: torch.Tensor | None = None
    announced = False
    held: list[ThinkerEvent] = []
    next_position = 0
    done: ThinkerDone | None = None
    while done is None or (with_rows and next_position < done.num_prompt_tokens + done.num_generated_tokens - 1):
        event = await queue.get()
        match event:
            case _Failed():
                raise event.error
            case _Positions():
                positions = event.positions
            case HiddenStates():
                skip = next_position - event.first_position  # recompute after preemption re-sends positions
                if skip >= len(event.rows):
                    continue
                if skip > 0:
                    event = HiddenStates(next_position, event.rows[skip:])
                next_position = event.first_position + len(event.rows)
                held.append(event)
            case ThinkerStart():
                start = event
            case ThinkerDone():
                done = event
            case _:
                held.append(event)
        if not announced and start is not None and (positions is not None or not with_rows):
            yield ThinkerStart(start.prompt_token_ids, positions)
            announced = True
        if announced:
            for item in held:
                yield item
            held.clear()
    yield done


def _classify(error: Exception) -> Exception:
    """vLLM's input checks (too long, media its processor rejects) become ThinkerInputError with the root cause's
    words; anything else (engine dead, internal failure) passes through unchanged."""
    if isinstance(error, EngineGenerateError) and isinstance(error.__cause__, ValueError):
        error = error.__cause__
    if not isinstance(error, ValueError | VLLMClientError):
        return error
    root = error
    while isinstance(root.__cause__, ValueError):
        root = root.__cause__
    return ThinkerInputError(str(root))


def _sampling_params(request: ThinkerRequest):
    from vllm import SamplingParams
    from vllm.platforms import current_platform
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    s: Sampling = request.sampling
    extra = {wire.TAP_KEY: request.request_id} if request.hidden_states else None
    # vLLM 0.32's CPU model runner kills its EngineCore on a seeded request whose prompt is prefilled in
    # chunks (it rewinds the request's generator: "CPU Generator does not use offset"), so on CPU the
    # thinker ignores seeds; the talker and Code2Wav still honour them.
    seed = None if current_platform.is_cpu() else s.seed
    structured = None
    if s.json_schema is not None:  # no free whitespace between tokens: a random model could pad forever
        structured = StructuredOutputsParams(json=s.json_schema, disable_any_whitespace=True)
    return SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        repetition_penalty=s.repetition_penalty,
        seed=seed,
        stop=list(s.stop),
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra,
        structured_outputs=structured,
    )
