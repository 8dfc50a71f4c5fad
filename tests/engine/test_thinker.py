"""The thinker engine on vLLM against transformers: tokens, positions, streamed hidden states, abort, bad input."""

from __future__ import annotations

import asyncio

import pytest
import torch
from oracle import Reference
from thinker_cases import CASES, reference_conversation

from omnitalk.engine.media import Video
from omnitalk.engine.request import Audio, Image, Message, Sampling, Text, ThinkerRequest
from omnitalk.engine.thinker.engine import ThinkerEngine, ThinkerInputError
from omnitalk.engine.thinker.events import HiddenStates, ThinkerDone, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.prompt import audio_feature_kwargs

MAX_TOKENS = 12
HIDDEN_TOLERANCE = 1e-4  # fp32, max abs difference
PREFILL_BUDGET = 32  # max_num_batched_tokens of the `thinker` fixture


def request(request_id: str, messages, *, max_tokens: int = MAX_TOKENS, hidden: bool = True, **kwargs):
    return ThinkerRequest(request_id, messages, Sampling(max_tokens=max_tokens), hidden_states=hidden, **kwargs)


async def collect(engine: ThinkerEngine, req: ThinkerRequest):
    """(prompt ids, generated ids, rows [positions, hidden] or None, events) of one streamed request."""
    events = [event async for event in engine.generate(req)]
    assert isinstance(events[0], ThinkerStart) and isinstance(events[-1], ThinkerDone)
    generated = [t for e in events if isinstance(e, ThinkerText) for t in e.token_ids]
    spans = [e for e in events if isinstance(e, HiddenStates)]
    rows = None
    if spans:
        assert [s.first_position for s in spans] == [0, *(s.first_position + len(s.rows) for s in spans[:-1])]
        rows = torch.cat([s.rows for s in spans]).float()
    return events[0].prompt_token_ids, generated, rows, events


def reference_positions(reference: Reference, inputs, use_audio_in_video: bool) -> torch.Tensor:
    """transformers' TMRoPE positions [3, L] of the prompt."""
    mask = inputs.get("feature_attention_mask")
    positions, _ = reference.model.thinker.get_rope_index(
        inputs["input_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs["attention_mask"],
        use_audio_in_video,
        mask.sum(-1) if mask is not None else None,
        inputs.get("video_second_per_grid"),
    )
    return positions[:, 0]


def assert_matches_reference(reference: Reference, case, prompt_ids, generated, rows, positions=None):
    clips = [p.samples for m in case.messages for p in m.content if isinstance(p, Audio)]
    clips += [p.audio for m in case.messages for p in m.content if isinstance(p, Video) and case.use_audio_in_video]
    inputs = reference.prompt_inputs(
        reference_conversation(case.messages, case.use_audio_in_video),
        use_audio_in_video=case.use_audio_in_video,
        **(audio_feature_kwargs(clips) if clips else {}),
    )
    expected = reference.generate_from_inputs(
        inputs, max_new_tokens=MAX_TOKENS, audio=False, use_audio_in_video=case.use_audio_in_video
    )
    assert prompt_ids == expected.prompt_ids
    assert generated == expected.thinker_tokens
    if positions is not None:
        assert torch.equal(positions, reference_positions(reference, inputs, case.use_audio_in_video))
    assert rows.shape == expected.hidden_states.shape  # L + N - 1 rows: the last token is never fed back
    assert (rows - expected.hidden_states).abs().max().item() < HIDDEN_TOLERANCE


@pytest.mark.parametrize("name", sorted(CASES))
async def test_tokens_and_hidden_states_equal_transformers(thinker, reference, name):
    case = CASES[name]
    prompt_ids, generated, rows, events = await collect(
        thinker, request(f"parity-{name}", case.messages, use_audio_in_video=case.use_audio_in_video)
    )
    assert_matches_reference(reference, case, prompt_ids, generated, rows, positions=events[0].positions)


async def test_concurrent_requests_of_different_lengths_stream_exact_rows(thinker, reference):
    names = ["text-short", "text-long", "image", "audio-3s"]
    results = await asyncio.gather(
        *(collect(thinker, request(f"concurrent-{n}", CASES[n].messages, use_audio_in_video=False)) for n in names)
    )
    for name, (prompt_ids, generated, rows, events) in zip(names, results, strict=True):
        # A prompt longer than the per-step token budget arrives over several steps, in several pieces.
        prompt_spans = [e for e in events if isinstance(e, HiddenStates) and e.first_position < len(prompt_ids)]
        assert len(prompt_spans) >= -(-len(prompt_ids) // PREFILL_BUDGET)
        assert_matches_reference(reference, CASES[name], prompt_ids, generated, rows)


async def test_text_only_request_streams_no_rows(thinker):
    _, generated, rows, _ = await collect(thinker, request("no-rows", CASES["text-short"].messages, hidden=False))
    assert rows is None and len(generated) == MAX_TOKENS


async def test_leaving_the_stream_aborts_the_request_and_frees_its_slot(thinker):
    stream = thinker.generate(request("to-abort", CASES["text-long"].messages, max_tokens=4000))
    texts = 0
    async for event in stream:
        texts += isinstance(event, ThinkerText)
        if texts == 3:
            break
    await stream.aclose()
    assert thinker.num_open_streams == 0
    for _ in range(50):  # the engine frees it on its next step; allow for a busy machine
        if not thinker.llm.output_processor.has_unfinished_requests():
            break
        await asyncio.sleep(0.1)
    assert not thinker.llm.output_processor.has_unfinished_requests()
    _, generated, _, _ = await collect(thinker, request("after-abort", CASES["text-short"].messages))
    assert len(generated) == MAX_TOKENS


async def test_prompt_beyond_the_context_window_is_refused_and_others_keep_running(thinker):
    too_long = (Message("user", (Text("hello " * thinker.max_model_len),)),)
    other = asyncio.create_task(collect(thinker, request("beside-too-long", CASES["text-short"].messages)))
    with pytest.raises(ThinkerInputError, match="maximum context length"):
        await collect(thinker, request("too-long", too_long))
    _, generated, _, _ = await other
    assert len(generated) == MAX_TOKENS


async def test_media_the_processor_rejects_gives_a_clear_error_and_the_engine_keeps_serving(thinker):
    from PIL import Image as PILImage

    sliver = (Message("user", (Image(PILImage.new("RGB", (6000, 20))), Text("what is this?"))),)  # aspect > 200
    with pytest.raises(ThinkerInputError, match="aspect ratio"):
        await collect(thinker, request("sliver-image", sliver))
    _, generated, _, _ = await collect(thinker, request("after-sliver", CASES["text-short"].messages))
    assert len(generated) == MAX_TOKENS


async def test_duplicate_request_id_is_refused(thinker):
    first = thinker.generate(request("dup", CASES["text-short"].messages))
    await anext(first)
    with pytest.raises(ThinkerInputError, match="already running"):
        await collect(thinker, request("dup", CASES["text-short"].messages))
    await first.aclose()
