"""Wire format of hidden-state rows from the vLLM worker to the engine: a msgpack header, then raw bytes."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import torch

# SamplingParams.extra_args key: its presence opts a request in, its value names the stream.
TAP_KEY = "omnitalk_hidden_states"
# additional_config key under which the engine tells the workers where to send rows.
ADDRESS_KEY = "omnitalk_hidden_states_address"


class RowSpan(msgspec.Struct, array_like=True, frozen=True):
    stream_id: str
    first_position: int
    num_rows: int


class PromptPositions(msgspec.Struct, array_like=True, frozen=True):
    """The TMRoPE positions the thinker gave a prompt, [3, L] flattened: the talker continues from them."""

    stream_id: str
    flat: list[int]


class RowBatch(msgspec.Struct, array_like=True, frozen=True):
    """One engine step's rows of every tapped request, in the order of the payload, and the positions of
    prompts whose prefill starts in this step."""

    dtype: str
    hidden_size: int
    spans: list[RowSpan]
    prompts: list[PromptPositions] = []
    failed: list[str] = []  # streams whose rows the worker could not publish: they fail, the engine lives on


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RowBatch)


def encode(
    spans: list[RowSpan], rows: torch.Tensor, prompts: list[PromptPositions] | None = None
) -> list[bytes | memoryview]:
    """Two frames: the header and the rows' bytes (rows on CPU, contiguous, [sum(num_rows), hidden])."""
    header = RowBatch(str(rows.dtype).removeprefix("torch."), rows.shape[-1], spans, prompts or [])
    return [_encoder.encode(header), memoryview(rows.view(torch.uint8).numpy()).cast("B")]


def encode_failure(stream_ids: list[str]) -> list[bytes | memoryview]:
    """A batch that only names streams whose rows are lost."""
    return [_encoder.encode(RowBatch("float32", 0, [], [], stream_ids)), b""]


def decode(
    frames: Sequence[bytes | memoryview],
) -> tuple[list[tuple[RowSpan, torch.Tensor]], dict[str, torch.Tensor], list[str]]:
    """The rows of each span, the positions [3, L] of each prompt announced in this step, the failed streams.
    Rows are views of a writable frame (a received ZMQ frame's buffer: no copy, at 7B a prefill chunk's rows
    are tens of MB); a read-only one is copied first."""
    header = _decoder.decode(frames[0])
    if not header.hidden_size:
        return [], {}, header.failed
    dtype = getattr(torch, header.dtype)
    payload = memoryview(frames[1])
    if payload.readonly:
        payload = memoryview(bytearray(payload))
    rows = torch.frombuffer(payload, dtype=dtype).view(-1, header.hidden_size)
    spans, offset = [], 0
    for span in header.spans:
        spans.append((span, rows[offset : offset + span.num_rows]))
        offset += span.num_rows
    prompts = {p.stream_id: torch.tensor(p.flat, dtype=torch.long).view(3, -1) for p in header.prompts}
    return spans, prompts, header.failed
