"""vLLM worker that publishes, after every forward, the last-layer hidden state of each row of tapped requests.

Named through vLLM's `worker_cls` setting; it subclasses the platform's own worker and overrides only
`init_device` (to refuse a runner it cannot read) and `execute_model`. It reads private model-runner state
(V1 runner only: `execute_model_state.hidden_states`, the final-norm output for every scheduled token, and the
batch layout), hence the pinned vLLM version, the pinned V1 runner and the parity tests. A row's position is
the request's computed-token count at the start of the step plus its offset in the step, so prompt rows leave
as each prefill chunk completes and each decode step sends one row: the hidden state of the token just fed
back. On CUDA rows leave the device through an asynchronous copy and are sent from a background thread, so
`execute_model` returns as soon as the copy is queued; on the CPU they are already in host memory and leave
at once, from `execute_model` (`Publisher`).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import torch
import zmq

from omnitalk.engine.thinker import rows as wire
from omnitalk.engine.thinker.config import check_runner

log = logging.getLogger(__name__)


def _platform_worker() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


@dataclass(slots=True)
class _Step:
    """One step's tapped rows; `ready`, when set, fires once a device-to-host copy has put them in `rows`."""

    spans: list[wire.RowSpan]
    rows: torch.Tensor  # [sum(num_rows), hidden] on the CPU (pinned when the model runs on CUDA)
    ready: torch.Event | None
    prompts: list[tuple[str, torch.Tensor]]  # (stream id, [3, L] CPU positions) of prompts starting now


class Publisher:
    """Sends steps on one ZMQ PUSH socket, in order. A step that cannot be sent is logged and its streams are
    named as failed, so that they end with an error instead of waiting for rows; the engine and every other
    request go on.

    `background=False` (rows already in host memory: the CPU runner): each step leaves from the caller's thread
    as it is submitted; zmq copies the rows into its message and its own I/O thread writes it, so a second
    Python thread would only add a hand-off (and, under vLLM's CPU thread binding, share the worker's core).
    `background=True` (rows on their way from a device): a thread waits on each step's copy event, releasing
    the GIL, then sends it, so `execute_model` never waits for the copy."""

    def __init__(self, address: str, *, background: bool) -> None:
        self._address = address
        self._steps: queue.SimpleQueue[_Step | list[str]] | None = None  # a list: failed stream ids
        self._socket: zmq.Socket | None = None
        if background:
            self._steps = queue.SimpleQueue()
            threading.Thread(target=self._run, name="omnitalk-tap", daemon=True).start()
        else:
            self._socket = self._connect()

    def submit(self, step: _Step) -> None:
        """`step.rows` must hold until sent: an inline send copies them before returning."""
        if self._steps is None:
            self._send(self._socket, step)
        else:
            self._steps.put(step)

    def fail(self, stream_ids: list[str]) -> None:
        if self._steps is None:
            self._send(self._socket, stream_ids)
        else:
            self._steps.put(stream_ids)

    def _connect(self) -> zmq.Socket:
        socket = zmq.Context.instance().socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, 0)  # queue rather than block: the EngineCore never waits for the reader
        socket.connect(self._address)
        return socket

    def _run(self) -> None:
        socket = self._connect()
        while True:
            self._send(socket, self._steps.get())

    def _send(self, socket: zmq.Socket, step: _Step | list[str]) -> None:
        try:
            if isinstance(step, list):
                socket.send_multipart(wire.encode_failure(step))
                return
            if step.ready is not None:
                step.ready.synchronize()  # releases the GIL while the copy finishes
            prompts = [wire.PromptPositions(key, pos.flatten().tolist()) for key, pos in step.prompts]
            # A pinned copy is the step's own: zero-copy. A CPU runner's rows are its buffer: copied now.
            socket.send_multipart(wire.encode(step.spans, step.rows, prompts), copy=step.ready is None)
        except Exception:
            log.exception("hidden-state tap: a step could not be sent; failing its streams")
            if isinstance(step, _Step):
                self._send_failure(socket, [span.stream_id for span in step.spans])

    @staticmethod
    def _send_failure(socket: zmq.Socket, stream_ids: list[str]) -> None:
        try:
            socket.send_multipart(wire.encode_failure(stream_ids))
        except Exception:
            log.exception("hidden-state tap: could not report failed streams %s", stream_ids)


def to_host(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Event | None]:
    """Starts copying device rows into pinned host memory and returns at once with the event that marks the
    copy's end; CPU rows are returned as they are. The copy is queued on the current stream, after the
    forward that wrote the rows and before the next step can overwrite vLLM's hidden-state buffer."""
    if rows.device.type == "cpu":
        return rows.contiguous(), None
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    ready = torch.Event(device=rows.device)
    ready.record()
    return host, ready


def gather(hidden: torch.Tensor, ranges: list[list[int]]) -> torch.Tensor:
    """The rows of `ranges` ([begin, end) rows of `hidden`, ascending, adjacent ones merged): a view when they
    are one range (every request of the step tapped, the common case), else one gather on the rows' device."""
    if len(ranges) == 1:
        return hidden[ranges[0][0] : ranges[0][1]]
    return torch.cat([hidden[begin:end] for begin, end in ranges])


class HiddenStateWorker(_platform_worker()):
    _publisher: Publisher | None = None
    _publishes: bool | None = None
    _announced: dict[str, int] | None = None  # per tapped request: the prompt length whose positions went out

    def init_device(self) -> None:
        super().init_device()
        check_runner(self.model_runner)

    def execute_model(self, scheduler_output):
        output = super().execute_model(scheduler_output)
        if self._should_publish():
            try:
                self._publish(scheduler_output.finished_req_ids)
            except Exception:  # the tapped requests of this step fail; the EngineCore and everyone else go on
                log.exception("publishing hidden states failed")
                self._report_failure()
        return output

    def _report_failure(self) -> None:
        """Names this step's tapped streams as failed; never raises (it runs inside the EngineCore)."""
        try:
            runner = self.model_runner
            requests = [runner.requests.get(r) for r in runner.input_batch.req_ids]
            ids = [(r.sampling_params.extra_args or {}).get(wire.TAP_KEY) for r in requests if r is not None]
            self._publisher.fail([i for i in ids if i is not None])
        except Exception:
            log.exception("reporting a hidden-state failure failed")

    def _should_publish(self) -> bool:
        if self._publishes is None:
            from vllm.distributed import get_pp_group, get_tp_group

            address = self.vllm_config.additional_config.get(wire.ADDRESS_KEY)
            first_tp_of_last_pp = get_tp_group().rank_in_group == 0 and get_pp_group().is_last_rank
            self._publishes = bool(address) and first_tp_of_last_pp
            if self._publishes:
                self._publisher = Publisher(address, background=self.model_runner.device.type != "cpu")
        return self._publishes

    def _publish(self, finished: set[str]) -> None:
        if self._announced is None:
            self._announced = {}
        for req_id in finished:
            self._announced.pop(req_id, None)
        runner = self.model_runner
        state = runner.execute_model_state
        if state is None:
            return
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        starts = runner.query_start_loc.np[: num_reqs + 1].tolist()  # host copies: reading them does not sync
        computed = batch.num_computed_tokens_cpu[:num_reqs].tolist()
        spans, ranges, prompts = [], [], []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            request = runner.requests[req_id]
            stream_id = (request.sampling_params.extra_args or {}).get(wire.TAP_KEY)
            if stream_id is None:
                continue
            begin, end = starts[i], starts[i + 1]
            first_position = computed[i]
            spans.append(wire.RowSpan(stream_id, first_position, end - begin))
            if ranges and ranges[-1][1] == begin:
                ranges[-1][1] = end
            else:
                ranges.append([begin, end])
            prompt_len = len(request.prompt_token_ids or ())
            # A prompt starts (again, after preemption), or a streaming-input request's prompt has grown by a chunk.
            grown = first_position == 0 or self._announced.get(req_id, 0) < prompt_len
            if request.mrope_positions is not None and grown:
                self._announced[req_id] = prompt_len
                positions = request.mrope_positions[:, :prompt_len]
                prompts.append((stream_id, positions.clone()))  # the runner may rewrite its own in place
        if spans:
            rows, ready = to_host(gather(state.hidden_states, ranges))
            self._publisher.submit(_Step(spans, rows, ready, prompts))
