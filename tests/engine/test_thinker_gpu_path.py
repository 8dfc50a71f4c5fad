"""The thinker's GPU path, exercised on the CPU: the runner check, the on-device embedding merge (run on the
`meta` device, where any host copy or `.item()` fails), the model-runner pin and the tap's publisher."""

from __future__ import annotations

import os
import tempfile
import uuid
from types import SimpleNamespace

import pytest
import torch
import zmq

from omnitalk.engine.thinker import rows as wire
from omnitalk.engine.thinker.config import (
    RUNNER_ENV,
    ThinkerConfig,
    ThinkerStartError,
    check_runner,
    check_vllm_config,
    checkpoint_dtype,
    pin_v1_runner,
)
from omnitalk.engine.thinker.engine import engine_args
from omnitalk.engine.thinker.model import OmniThinkerForConditionalGeneration, merge_by_modality
from omnitalk.engine.thinker.tap import Publisher, _Step, gather, to_host

VIDEO, AUDIO, IMAGE, TEXT = 7, 8, 9, 1


def test_v1_runners_pass_and_model_runner_v2_is_refused():
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CPURunnerV2
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as CPURunnerV1
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPURunnerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as GPURunnerV1

    for runner in (CPURunnerV1, GPURunnerV1):
        check_runner(object.__new__(runner))  # the tap reads these
    for runner in (CPURunnerV2, GPURunnerV2):
        with pytest.raises(ThinkerStartError, match="not one the hidden-state tap supports"):
            check_runner(object.__new__(runner))


def test_the_runner_is_pinned_to_v1_and_a_v2_request_refused(monkeypatch):
    monkeypatch.delenv(RUNNER_ENV, raising=False)
    pin_v1_runner()
    assert os.environ[RUNNER_ENV] == "0"
    monkeypatch.setenv(RUNNER_ENV, "1")
    with pytest.raises(ThinkerStartError, match="V1 runner"):
        pin_v1_runner()


def test_a_vllm_config_on_model_runner_v2_is_refused(tiny_dir, monkeypatch):
    monkeypatch.setenv(RUNNER_ENV, "0")
    config = engine_args(ThinkerConfig(model=tiny_dir, max_model_len=512), "ipc:///unused").create_engine_config()
    check_vllm_config(config)
    # vLLM decides per call (`use_v2_model_runner` reads the environment); on CPU it cannot build a V2 config
    # at all (no Triton), so this is how a CUDA machine's choice of V2 looks to the check.
    monkeypatch.setenv(RUNNER_ENV, "1")
    with pytest.raises(ThinkerStartError, match="Model Runner V2"):
        check_vllm_config(config)


def test_the_served_dtype_is_the_checkpoints(tiny_dir, tmp_path):
    assert checkpoint_dtype(tiny_dir) == "float32"  # no torch_dtype in its config: its weights' dtype
    (tmp_path / "config.json").write_text('{"thinker_config": {"torch_dtype": "bfloat16"}}')
    assert checkpoint_dtype(tmp_path) == "bfloat16"  # as Qwen2.5-Omni-7B's config says


def modality(tensor: torch.Tensor, name: str) -> torch.Tensor:
    tensor.modality = name  # what vLLM's encoder gather sets
    return tensor


def test_merge_by_modality_is_right_whatever_the_embedding_order():
    # A chunk cutting an audio-in-video block: `A A V V`, while the embeddings come video first.
    ids = torch.tensor([TEXT, AUDIO, AUDIO, VIDEO, VIDEO, IMAGE, TEXT])
    is_mm = ids != TEXT
    embeds = torch.zeros(7, 2)
    video = modality(torch.full((2, 2), 1.0), "video")
    audio = modality(torch.full((2, 2), 2.0), "audio")
    image = modality(torch.full((1, 2), 3.0), "image")
    merged = merge_by_modality(embeds, [video, audio, image], ids, is_mm, video_token=VIDEO, audio_token=AUDIO)
    assert merged[:, 0].tolist() == [0.0, 2.0, 2.0, 1.0, 1.0, 3.0, 0.0]


def meta_thinker(hidden: int) -> OmniThinkerForConditionalGeneration:
    """The model class's own embed_input_ids with a meta-device embedding table: nothing else is built."""
    model = OmniThinkerForConditionalGeneration.__new__(OmniThinkerForConditionalGeneration)
    torch.nn.Module.__init__(model)
    model.config = SimpleNamespace(video_token_index=VIDEO, audio_token_index=AUDIO)
    table = torch.nn.Embedding(16, hidden, device="meta")
    model.get_language_model = lambda: SimpleNamespace(embed_input_ids=table)
    return model


def test_embed_input_ids_runs_with_every_input_on_the_meta_device():
    model = meta_thinker(hidden=4)
    ids = torch.tensor([TEXT, AUDIO, AUDIO, VIDEO, VIDEO, TEXT], device="meta")
    is_mm = torch.tensor([False, True, True, True, True, False])  # the V1 runner's mask is on the host
    embeddings = [
        modality(torch.empty(2, 4, device="meta"), "video"),
        modality(torch.empty(2, 4, device="meta"), "audio"),
    ]
    out = model.embed_input_ids(ids, embeddings, is_multimodal=is_mm)
    assert out.device.type == "meta" and out.shape == (6, 4)
    plain = model.embed_input_ids(ids)  # no media: the text embedding alone
    assert plain.device.type == "meta" and plain.shape == (6, 4)


class _Broken:
    def synchronize(self) -> None:
        raise RuntimeError("copy failed")


def test_a_step_that_fails_to_publish_fails_its_streams_and_the_next_arrives():
    address = f"ipc://{tempfile.gettempdir()}/omnitalk-test-{uuid.uuid4().hex[:8]}"
    socket = zmq.Context.instance().socket(zmq.PULL)
    socket.bind(address)
    socket.setsockopt(zmq.RCVTIMEO, 30_000)
    try:
        publisher = Publisher(address, background=True)
        rows, ready = to_host(torch.arange(6, dtype=torch.float32).view(3, 2))
        assert ready is None  # CPU rows need no copy
        span = [wire.RowSpan("s", 0, 3)]
        publisher.submit(_Step(span, rows, _Broken(), []))
        publisher.submit(_Step(span, rows, None, [("s", torch.arange(9).view(3, 3))]))
        assert wire.decode(socket.recv_multipart()) == ([], {}, ["s"])  # the broken step's stream fails
        spans, prompts, failed = wire.decode(socket.recv_multipart())
        assert not failed and spans[0][0] == span[0] and torch.equal(spans[0][1], rows)
        assert torch.equal(prompts["s"], torch.arange(9).view(3, 3))
    finally:
        socket.close(linger=0)


def test_cpu_rows_leave_at_once_as_a_copy_of_the_runners_buffer():
    address = f"ipc://{tempfile.gettempdir()}/omnitalk-test-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(address, background=False)  # nobody reads yet: zmq holds the message
    hidden = torch.randn(400, 64)  # 100 KB: above pyzmq's zero-copy threshold
    expected = hidden[:300].clone()
    rows, ready = to_host(gather(hidden, [[0, 300]]))
    publisher.submit(_Step([wire.RowSpan("s", 0, 300)], rows, ready, []))
    hidden.zero_()  # the next step overwrites the runner's buffer
    socket = zmq.Context.instance().socket(zmq.PULL)
    socket.bind(address)
    socket.setsockopt(zmq.RCVTIMEO, 30_000)
    try:
        spans, _, failed = wire.decode(socket.recv_multipart())
        assert not failed and torch.equal(spans[0][1], expected)
    finally:
        socket.close(linger=0)


def test_gather_is_a_view_for_one_range_and_a_copy_of_the_rows_for_several():
    hidden = torch.arange(20.0).view(10, 2)
    one = gather(hidden, [[2, 6]])
    assert one.data_ptr() == hidden[2].data_ptr() and torch.equal(one, hidden[2:6])
    assert torch.equal(gather(hidden, [[0, 1], [3, 5]]), hidden[[0, 3, 4]])
