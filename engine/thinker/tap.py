"""vLLM worker that publishes, after every forward, the last-layer hidden state of each row of tapped requests.

Named through vLLM's `worker_cls` setting; it subclasses the platform's own worker and overrides only
`execute_model`. It reads private model-runner state (V1 runner: `execute_model_state.hidden_states`, the
final-norm output for every scheduled token, and the batch layout), hence the pinned vLLM version and the
parity tests. A row's position is the request's computed-token count at the start of the step plus its
offset in the step, so prompt rows leave as each prefill chunk completes and each decode step sends one
row: the hidden state of the token just fed back.
"""

from __future__ import annotations

import logging

import torch
import zmq

from omnitalk.engine.thinker import rows as wire

log = logging.getLogger(__name__)


def _platform_worker() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


class HiddenStateWorker(_platform_worker()):
    _socket: zmq.Socket | None = None
    _publishes: bool | None = None

    def execute_model(self, scheduler_output):
        output = super().execute_model(scheduler_output)
        if self._should_publish():
            try:
                self._publish()
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
            self._socket.send_multipart(wire.encode_failure([i for i in ids if i is not None]))
        except Exception:
            log.exception("reporting a hidden-state failure failed")

    def _should_publish(self) -> bool:
        if self._publishes is None:
            from vllm.distributed import get_pp_group, get_tp_group

            address = self.vllm_config.additional_config.get(wire.ADDRESS_KEY)
            first_tp_of_last_pp = get_tp_group().rank_in_group == 0 and get_pp_group().is_last_rank
            self._publishes = bool(address) and first_tp_of_last_pp
            if self._publishes:
                self._socket = zmq.Context.instance().socket(zmq.PUSH)
                self._socket.connect(address)
        return self._publishes

    def _publish(self) -> None:
        runner = self.model_runner
        state = runner.execute_model_state
        if state is None:
            return
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        starts = runner.query_start_loc.np[: num_reqs + 1]
        spans, pieces, prompts = [], [], []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            request = runner.requests[req_id]
            stream_id = (request.sampling_params.extra_args or {}).get(wire.TAP_KEY)
            if stream_id is None:
                continue
            begin, end = int(starts[i]), int(starts[i + 1])
            first_position = int(batch.num_computed_tokens_cpu[i])
            spans.append(wire.RowSpan(stream_id, first_position, end - begin))
            pieces.append(state.hidden_states[begin:end])
            if first_position == 0 and request.mrope_positions is not None:
                positions = request.mrope_positions[:, : len(request.prompt_token_ids or ())]
                prompts.append(wire.PromptPositions(stream_id, positions.flatten().tolist()))
        if spans:
            rows = torch.cat(pieces).to("cpu", non_blocking=False).contiguous()
            self._socket.send_multipart(wire.encode(spans, rows, prompts), copy=False)
