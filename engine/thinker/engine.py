"""The thinker engine: vLLM's AsyncLLM plus the hidden-state rows its worker publishes, merged per request."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator

from vllm.exceptions import VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from omnitalk.engine.failure import EngineFailure
from omnitalk.engine.request import Sampling, ThinkerRequest
from omnitalk.engine.thinker import rows as wire
from omnitalk.engine.thinker.config import ThinkerConfig, check_vllm_config, pin_v1_runner, served_dtype
from omnitalk.engine.thinker.conversation import (
    AUDIO_PLACEHOLDER,
    Recorder,
    SessionStates,
    session_prompt,
)
from omnitalk.engine.thinker.events import ThinkerDone, ThinkerEvent, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.ordering import Arrived, by_stream, fail, ordered
from omnitalk.engine.thinker.prompt import PromptError, build_prompt
from omnitalk.engine.thinker.receiver import Decoded, RowReceiver
from omnitalk.engine.thinker.session_request import keys_of, processed, put_covered

log = logging.getLogger(__name__)
WORKER_CLS = "omnitalk.engine.thinker.tap.HiddenStateWorker"


def engine_args(config: ThinkerConfig, rows_address: str):
    """vLLM's AsyncEngineArgs for `config`; the tap's worker class and its socket address ride along."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    memory = config.gpu_memory_utilization or (0.25 if current_platform.is_cpu() else 0.6)
    return AsyncEngineArgs(
        model=str(config.model),
        dtype=served_dtype(config),
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enable_chunked_prefill=True,
        enable_prefix_caching=config.enable_prefix_caching,
        enable_mm_embeds=True,  # streaming input gives vLLM audio blocks as precomputed features (streaming.py)
        gpu_memory_utilization=memory,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.enforce_eager,
        kv_cache_dtype=config.kv_cache_dtype,
        quantization=config.quantization,
        distributed_executor_backend=config.distributed_executor_backend,
        seed=config.seed,
        worker_cls=WORKER_CLS,
        # Compact JSON for forced tool calls: with free whitespace a random or weak model can pad forever.
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        additional_config={wire.ADDRESS_KEY: rows_address},
    )


class ThinkerInputError(ValueError):
    """The request cannot be served as given (bad conversation, too long for the context window, ...)."""


class _Uncovered(Exception):
    """vLLM served more of a session request's prefix from its cache than the session has rows for."""


class ThinkerEngine:
    """`generate(request)` streams ThinkerEvents; leaving the stream early aborts the request in vLLM."""

    def __init__(self, config: ThinkerConfig) -> None:
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        pin_v1_runner()
        self._address = f"ipc://{tempfile.gettempdir()}/omnitalk-rows-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        args = engine_args(config, self._address)
        vllm_config = args.create_engine_config()
        check_vllm_config(vllm_config)
        self._rows = RowReceiver(self._address)
        self.llm = AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=args.disable_log_stats)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.max_model_len = self.llm.model_config.max_model_len
        self._streams: dict[str, asyncio.Queue] = {}
        self._tapped: set[str] = set()  # streams that wait for rows
        self._receiver: asyncio.Task | None = None
        self._stopping = False
        self.num_receiver_failures = 0  # times the row receiver died and was restarted
        config = self.llm.model_config.hf_config
        num_mels = getattr(config, "thinker_config", config).audio_config.num_mel_bins
        self.sessions = SessionStates(max_rows=self.max_model_len, num_mels=num_mels)
        self.num_resent = 0  # session requests resent alone: vLLM had cached more than the session's rows cover
        self._audio_token = self.tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER)

    @property
    def failure(self) -> str | None:
        """Why the thinker cannot serve (its EngineCore is dead), or None."""
        if self.llm.errored and not self._stopping:
            return "the thinker's EngineCore is dead"
        return None

    def shutdown(self) -> None:
        self._stopping = True
        if self._receiver is not None:
            self._receiver.cancel()
        self.llm.shutdown()
        self._rows.close()

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    async def generate(self, request: ThinkerRequest) -> AsyncIterator[ThinkerEvent]:
        if request.request_id in self._streams:
            raise ThinkerInputError(f"request id {request.request_id!r} is already running")
        key = request.request_id  # the stream's id in vLLM and the tap; a resend gets another
        queue = self._claim(key, request.hidden_states)  # claimed before the first await, so ids stay unique
        producer: asyncio.Task | None = None
        done = False
        try:
            session = self._session_of(request)
            try:  # rendering a long conversation's chat template takes milliseconds: not on the event loop
                prompt = await asyncio.to_thread(self._render, request, session)
            except PromptError as error:
                raise ThinkerInputError(str(error)) from error
            if request.hidden_states:
                self._ensure_receiver()
            recorder = Recorder() if session is not None else None
            while True:
                attempt = dataclasses.replace(request, request_id=key)
                submitted, covered = await self._submit(attempt, prompt, queue, session, recorder)
                keys = tuple(recorder.keys) if recorder is not None else None
                producer = asyncio.create_task(self._pump(attempt, submitted, queue, covered, keys))
                try:
                    async for event in ordered(queue, request.hidden_states):
                        done = isinstance(event, ThinkerDone)
                        if recorder is not None:
                            recorder.add(event)
                            if done:
                                recorder.store(self.sessions, request.session)
                        yield event
                    break
                except _Uncovered:  # nothing was yielded yet: resend under a fresh salt, with a fresh stream
                    self.num_resent += 1
                    producer.cancel()
                    await self.abort(key)
                    self._release(key)
                    key, session = f"{request.request_id}#resent", None
                    queue = self._claim(key, request.hidden_states)
        finally:
            self._release(key)
            if producer is not None:
                producer.cancel()
                if not done:
                    await self.abort(key)

    def _claim(self, key: str, hidden_states: bool) -> asyncio.Queue:
        # Bounded by construction: at most one text and one rows item per engine step and position (plus the
        # stored rows of a session's prefix, one item).
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * self.max_model_len + 5)
        self._streams[key] = queue
        if hidden_states:
            self._tapped.add(key)
        return queue

    def _release(self, key: str) -> None:
        self._streams.pop(key, None)
        self._tapped.discard(key)

    def _session_of(self, request: ThinkerRequest) -> str | None:
        """The salt of a request that reuses its session's state; None: it is salted alone (if it wants rows)."""
        if request.session is None or not request.hidden_states:
            return None
        return None if request.use_audio_in_video else request.session

    def _render(self, request: ThinkerRequest, session: str | None) -> dict:
        prompt = build_prompt(request.messages, self.tokenizer, use_audio_in_video=request.use_audio_in_video)
        if session is None:
            return prompt
        return session_prompt(prompt, self.sessions.clip_items(session), self._audio_token)

    async def _submit(
        self,
        request: ThinkerRequest,
        prompt: dict,
        queue: asyncio.Queue,
        session: str | None,
        recorder: Recorder | None,
    ):
        """What `_pump` sends, and how many leading positions have their rows already in `queue` (None: the
        request is salted alone, vLLM computes every position). A session's request is processed here (in a
        thread, as vLLM would) so that its positions' content keys are known before vLLM computes anything:
        the rows the session holds for its prefix must be in the stream before the tap's first rows."""
        if not request.hidden_states:
            return prompt, None
        if session is None:
            return {**prompt, "cache_salt": request.request_id}, None  # cached positions would have no rows
        try:
            salted = {**prompt, "cache_salt": session}
            core = await processed(self.llm, request.request_id, salted, _sampling_params(request))
        except Exception as error:
            raise _classify(error) from error
        keys = keys_of(core)
        covered = put_covered(self.sessions.get(session), keys, queue)
        assert recorder is not None
        recorder.keys = keys
        return core, covered

    async def abort(self, request_id: str) -> None:
        """Idempotent: unknown or finished ids are ignored."""
        await self.llm.abort(request_id)

    def forget_session(self, session: str) -> None:
        """The session ended: its rows are dropped."""
        self.sessions.forget(session)

    async def _pump(
        self, request: ThinkerRequest, prompt, queue: asyncio.Queue, covered: int | None, keys: tuple[bytes, ...] | None
    ) -> None:
        """`covered`: the leading positions whose rows are in the stream already; vLLM reporting more cached
        positions than that ends the stream with _Uncovered (before anything is announced). `keys`: the prompt's
        content keys (a session's request), announced in ThinkerStart."""
        params = _sampling_params(request)
        generated = 0
        cached = 0
        started = False
        try:
            async for output in self.llm.generate(prompt, params, request.request_id):
                if not started:
                    cached = output.num_cached_tokens or 0
                    if covered is not None and cached > covered:
                        fail(queue, _Uncovered())
                        return
                    queue.put_nowait(ThinkerStart(list(output.prompt_token_ids or ()), content_keys=keys))
                    started = True
                completion = output.outputs[0]
                generated += len(completion.token_ids)
                queue.put_nowait(ThinkerText(list(completion.token_ids), completion.text))
                if output.finished:
                    prompt_len = len(output.prompt_token_ids or ())
                    reason = completion.finish_reason or "stop"
                    queue.put_nowait(ThinkerDone(reason, prompt_len, generated, cached))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            fail(queue, _classify(error))

    def _ensure_receiver(self) -> None:
        if self._receiver is None or self._receiver.done():
            self._receiver = asyncio.create_task(self._receive_rows())
            self._receiver.add_done_callback(self._receiver_ended)

    def _receiver_ended(self, task: asyncio.Task) -> None:
        """However the receiver ended (an exception, a cancellation), the streams waiting for rows fail now rather
        than wait forever; the next request that wants rows starts a new receiver."""
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        log.error("the hidden-state receiver stopped (%r); failing %d streams", error, len(self._tapped))
        self.num_receiver_failures += 1
        for stream_id in list(self._tapped):
            self._fail_stream(stream_id, "the thinker's hidden-state receiver failed")

    def _fail_stream(self, stream_id: str, reason: str) -> None:
        self._tapped.discard(stream_id)
        queue = self._streams.pop(stream_id, None)
        if queue is not None:
            fail(queue, EngineFailure(reason))

    async def _receive_rows(self) -> None:
        await self._rows.run(self._deliver)

    def _deliver(self, messages: list[Decoded]) -> None:
        """Fails the streams the worker named, then gives every other stream one item with all its rows."""
        arrived, failed = by_stream(messages)
        for stream_id in failed:
            self._fail_stream(stream_id, "the thinker could not publish this request's hidden states")
        for stream_id, items in arrived.items():
            queue = self._streams.get(stream_id)
            if queue is None:
                continue  # aborted, finished or failed: late rows are dropped
            try:
                queue.put_nowait(Arrived(items))
            except asyncio.QueueFull:
                log.error("hidden-state queue of %s overflowed; failing it", stream_id)
                self._fail_stream(stream_id, "the thinker's hidden-state queue overflowed")


def _classify(error: Exception) -> Exception:
    """vLLM's input checks (too long, media its processor rejects) become ThinkerInputError with the root cause's
    words; anything else (engine dead, internal failure) passes through unchanged."""
    if isinstance(error, EngineDeadError):
        return EngineFailure("the thinker's EngineCore died")
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
    if s.json_schema is not None:  # compact JSON: the engine's structured_outputs_config (engine_args)
        structured = StructuredOutputsParams(json=s.json_schema)
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
