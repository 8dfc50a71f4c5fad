"""Streaming input on vLLM: the chunk format vLLM takes, a turn prefilled block by block answering exactly as the
conversation sent at once, blocks prefilled before the turn ends, and nothing left behind when a turn is dropped.
Every await is bounded, so that a hang fails in a minute instead of stalling the run."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import numpy as np
import pytest
import torch
from released import assert_released
from thinker_cases import tone

from omnitalk.engine.omni import AudioDelta, Finished, OmniEngine, OmniRequest, Speech, TextDelta
from omnitalk.engine.request import Audio, Message, Sampling, Text, ThinkerRequest
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.engine.thinker.engine import ThinkerEngine
from omnitalk.engine.thinker.events import HiddenStates, ThinkerDone, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.features import BLOCK_SAMPLES, LOOKAHEAD, clip_features, split_blocks
from omnitalk.engine.thinker.prompt import SPEECH_SYSTEM_PROMPT, audio_token_count
from omnitalk.engine.thinker.streaming import AUDIO_PLACEHOLDER, ThinkerIngest, audio_chunk, prefill_params

log = logging.getLogger(__name__)
MAX_TOKENS = 12
HIDDEN_TOLERANCE = 1e-4  # as tests/engine/test_thinker.py
PIECE = 1600  # 100 ms of audio per append, as a Realtime client sends it
TIMEOUT = 120.0  # seconds for any one await: far above a step on a loaded CPU, far below a stalled run

SYSTEM = Message("system", (Text(SPEECH_SYSTEM_PROMPT),))
EARLIER = (
    SYSTEM,
    Message("user", (Audio(tone(1.3, hz=180.0, seed=3)),)),
    Message("assistant", (Text("I heard a low hum."),)),
    Message("user", (Text("Now listen to this."),)),
    Message("assistant", (Text("Go ahead."),)),
)


async def bounded(awaitable):
    return await asyncio.wait_for(awaitable, TIMEOUT)


async def drain(stream) -> list:
    """Every item of an async iterator, each within TIMEOUT."""
    items = []
    while True:
        try:
            items.append(await bounded(anext(stream)))
        except StopAsyncIteration:
            return items


async def session(engine: ThinkerEngine, request_id: str, prompts: list[dict], last_params) -> list:
    """Sends `prompts` as one streaming-input request, each chunk only once the one before it has completed;
    returns the outputs, each logged with its finish_reason and finished."""
    from vllm.engine.protocol import StreamingInput

    completed = asyncio.Queue()

    async def chunks():
        for k, prompt in enumerate(prompts):
            if k:
                await bounded(completed.get())
            yield StreamingInput(prompt, last_params if k == len(prompts) - 1 else None)

    outputs = []
    stream = engine.llm.generate(chunks(), prefill_params(None), request_id)
    while True:
        try:
            output = await bounded(anext(stream))
        except StopAsyncIteration:
            return outputs
        completion = output.outputs[0]
        log.info("%s: %s finish_reason=%s finished=%s", request_id, completion.token_ids, completion.finish_reason,
                 output.finished)  # fmt: skip
        outputs.append(output)
        if completion.finish_reason is not None:
            completed.put_nowait(None)


def final_params(max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA)


async def test_a_text_session_of_two_chunks_completes_each_and_ends(thinker):
    """The format pinned: each chunk's completion comes back with finish_reason set and finished False, the
    last chunk's with finished True; the answer is the one to the two chunks sent as one prompt."""
    ids = thinker.tokenizer.encode("Hello there, how are you today?")
    outputs = await session(thinker, "pin-text", [{"prompt_token_ids": ids[:4]}, {"prompt_token_ids": ids[4:]}],
                            final_params(5))  # fmt: skip
    first, rest = outputs[0], outputs[1:]
    assert first.outputs[0].finish_reason == "length" and not first.finished
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "length"
    answer = [t for o in rest for t in o.outputs[0].token_ids]
    whole = [o async for o in thinker.llm.generate({"prompt_token_ids": ids}, final_params(5), "pin-text-whole")]
    assert answer == [t for o in whole for t in o.outputs[0].token_ids]
    assert list(rest[-1].prompt_token_ids) == ids


async def test_an_audio_chunk_of_precomputed_features_is_taken(thinker):
    """A 2 s block as features, beside a text head and a text tail: vLLM expands one <|AUDIO|> into the
    block's 50 tokens and the session ends normally."""
    token = thinker.tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER)
    features = clip_features(tone(2.0, seed=1), num_mels(thinker))
    head = {"prompt": "<|im_start|>user\n<|audio_bos|>"}
    tail = thinker.tokenizer.encode("<|audio_eos|><|im_end|>\n<|im_start|>assistant\n")
    outputs = await session(thinker, "pin-audio", [head, audio_chunk(token, [features], tail)], final_params(3))
    assert outputs[-1].finished
    prompt = list(outputs[-1].prompt_token_ids)
    assert prompt.count(token) == audio_token_count(2 * 16000) == 50
    assert prompt[-len(tail) :] == tail


async def test_a_chunk_of_several_audio_items_is_taken(thinker):
    """One item per 2 s block and one for the rest, in one chunk: each <|AUDIO|> is expanded into its own
    item's tokens, which add up to the whole clip's."""
    token = thinker.tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER)
    samples = tone(5.37, seed=1)
    items = split_blocks(clip_features(samples, num_mels(thinker)))
    assert [item.shape[1] for item in items] == [200, 200, 137]
    head = {"prompt": "<|im_start|>user\n<|audio_bos|>"}
    tail = thinker.tokenizer.encode("<|audio_eos|><|im_end|>\n<|im_start|>assistant\n")
    outputs = await session(thinker, "pin-items", [head, audio_chunk(token, items, tail)], final_params(3))
    assert outputs[-1].finished
    prompt = list(outputs[-1].prompt_token_ids)
    assert prompt.count(token) == audio_token_count(len(samples)) == 50 + 50 + 34
    assert prompt[-len(tail) :] == tail


def num_mels(engine: ThinkerEngine) -> int:
    config = engine.llm.model_config.hf_config
    return getattr(config, "thinker_config", config).audio_config.num_mel_bins


def summary(events) -> tuple[list[int], torch.Tensor | None, list[int], torch.Tensor | None]:
    """(prompt ids, prompt positions, generated ids, rows) of one answer's events."""
    assert isinstance(events[0], ThinkerStart) and isinstance(events[-1], ThinkerDone)
    generated = [t for e in events if isinstance(e, ThinkerText) for t in e.token_ids]
    spans = [e for e in events if isinstance(e, HiddenStates)]
    assert [s.first_position for s in spans] == [0, *(s.first_position + len(s.rows) for s in spans[:-1])]
    rows = torch.cat([s.rows for s in spans]).float()
    return events[0].prompt_token_ids, events[0].positions, generated, rows


def turn_request(request_id: str, history, samples: np.ndarray, sampling: Sampling) -> ThinkerRequest:
    conversation = (*history, Message("user", (Audio(samples),)))
    return ThinkerRequest(request_id, conversation, sampling, hidden_states=True)


async def at_once(engine: ThinkerEngine, request_id: str, history, samples: np.ndarray, sampling: Sampling):
    return summary(await drain(engine.generate(turn_request(request_id, history, samples, sampling))))


async def ingested(engine: ThinkerEngine, request_id: str, history, samples: np.ndarray, sampling: Sampling, *,
                   real_time: bool = True):  # fmt: skip
    """Appends the audio in 100 ms pieces, letting each complete block's prefill finish (as real time would;
    else all at once, so blocks queue behind the one in flight), then ends the turn; returns the answer's
    summary, the blocks prefilled when the turn ended and the sessions restarted."""
    ingest = ThinkerIngest(engine, request_id, history, hidden_states=True)
    await bounded(ingest.start())
    for start in range(0, len(samples), PIECE):
        ingest.push_audio(samples[start : start + PIECE])
        if real_time:
            await bounded(ingest.wait_prefilled(ingest.pushed_blocks))
    prefilled = ingest.prefilled_blocks
    events = await drain(ingest.finish(turn_request(request_id, history, samples, sampling)))
    assert ingest.fallback == (None if not sampling.stop else "stop strings")
    return summary(events), prefilled, ingest.restarts


def assert_same_answer(streamed, whole) -> None:
    prompt_ids, positions, generated, rows = streamed
    assert prompt_ids == whole[0]
    assert torch.equal(positions, whole[1])
    assert generated == whole[2]
    assert rows.shape == whole[3].shape
    assert (rows - whole[3]).abs().max().item() < HIDDEN_TOLERANCE


def complete_blocks(samples: np.ndarray) -> int:
    return (len(samples) - LOOKAHEAD) // BLOCK_SAMPLES


@pytest.mark.parametrize(
    ("seconds", "history"),
    [(30.1, (SYSTEM,)), (5.37, (SYSTEM,)), (6.5, EARLIER)],
    ids=["30s", "not-a-multiple-of-2s", "after-earlier-turns"],
)
async def test_an_ingested_turn_answers_as_the_conversation_sent_at_once(thinker, seconds, history):
    """Greedy tokens, positions and every row equal; every complete block was prefilled before the turn ended."""
    samples = tone(seconds, seed=7)
    sampling = Sampling(max_tokens=MAX_TOKENS)
    streamed, prefilled, restarts = await ingested(thinker, f"ingest-{seconds}", history, samples, sampling)
    assert prefilled == complete_blocks(samples) == int(seconds) // 2
    assert restarts == 0  # the tone is as loud in its first block as anywhere
    assert_same_answer(streamed, await at_once(thinker, f"whole-{seconds}", history, samples, sampling))


async def test_blocks_still_queued_at_the_turns_end_travel_with_the_last_chunk(thinker):
    """Audio faster than the prefill: whatever was not yet sent goes in the final chunk, same answer."""
    samples = tone(9.3, hz=300.0, seed=4)
    sampling = Sampling(max_tokens=MAX_TOKENS)
    streamed, prefilled, _ = await ingested(thinker, "ingest-backlog", (SYSTEM,), samples, sampling, real_time=False)
    assert prefilled < complete_blocks(samples)
    assert_same_answer(streamed, await at_once(thinker, "whole-backlog", (SYSTEM,), samples, sampling))


def louder_and_louder() -> np.ndarray:
    """7 s whose second and third blocks are each louder than all before: each moves the clamp of a block already
    prefilled (the first's quietest values lie under the new floor), the rest does not."""
    return np.concatenate([0.3 * tone(2.2, seed=1), 0.6 * tone(2.0, seed=3), tone(2.8, seed=2)])


async def test_a_turn_whose_loudest_block_comes_late_restarts_and_answers_as_sent_at_once(thinker):
    """The session is restarted while the audio arrives, so the turn is still answered from it, exactly."""
    samples = louder_and_louder()
    sampling = Sampling(max_tokens=MAX_TOKENS)
    streamed, prefilled, restarts = await ingested(thinker, "ingest-louder", (SYSTEM,), samples, sampling)
    assert restarts == 2 and prefilled == complete_blocks(samples) == 3
    assert_same_answer(streamed, await at_once(thinker, "whole-louder", (SYSTEM,), samples, sampling))
    await assert_released(thinker)


async def test_a_restart_releases_the_session_it_replaces(thinker):
    """The replaced session leaves vLLM (its KV freed) and the tap while its successor goes on; closing the
    successor leaves nothing."""
    ingest = ThinkerIngest(thinker, "restarted", (SYSTEM,), hidden_states=True)
    await bounded(ingest.start())
    samples = louder_and_louder()
    ingest.push_audio(samples[: BLOCK_SAMPLES + LOOKAHEAD])
    await bounded(ingest.wait_prefilled(1))
    ingest.push_audio(samples[BLOCK_SAMPLES + LOOKAHEAD : 2 * BLOCK_SAMPLES + LOOKAHEAD])
    assert ingest.restarts == 1
    assert list(thinker._streams) == ["restarted#ingest1"] and thinker._tapped == {"restarted#ingest1"}
    await bounded(ingest.wait_prefilled(2))

    def in_vllm() -> set[str]:  # vLLM suffixes its own request ids
        return {key.rsplit("-", 1)[0] for key in thinker.llm.output_processor.request_states}

    for _ in range(100):  # the abort is sent from a task of its own
        if "restarted#ingest0" not in in_vllm():
            break
        await asyncio.sleep(0.1)
    assert in_vllm() == {"restarted#ingest1"}
    await bounded(ingest.close())
    await assert_released(thinker)


def spoken(events) -> tuple[list[int], np.ndarray, Finished]:
    """(text ids, waveform, the Finished event) of one OmniEngine answer."""
    assert isinstance(events[-1], Finished)
    text_ids = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    audio = [e.samples for e in events if isinstance(e, AudioDelta)]
    return text_ids, np.concatenate(audio) if audio else np.zeros(0, np.float32), events[-1]


async def test_an_ingested_spoken_turn_speaks_as_the_conversation_sent_at_once(omni: OmniEngine):
    """Through the whole engine: the talker and Code2Wav get the same rows, positions and tokens, so the
    ingested turn's speech is the one the conversation sent at once gets."""
    samples = tone(5.37, seed=7)  # tone(5.37, hz=240.0, seed=8) would fall back: one value of block 0 is clamped
    speech = Speech("Chelsie", TalkerSampling(temperature=0.0, seed=0, max_tokens=150))
    request = OmniRequest(
        "spoken-ingest", (SYSTEM, Message("user", (Audio(samples),))), Sampling(max_tokens=12), speech
    )
    ingest = ThinkerIngest(omni.thinker, "spoken-ingest", (SYSTEM,), hidden_states=True)
    await bounded(ingest.start())
    for start in range(0, len(samples), PIECE):
        ingest.push_audio(samples[start : start + PIECE])
        await bounded(ingest.wait_prefilled(ingest.pushed_blocks))
    text_ids, waveform, finished = spoken(await drain(omni.generate(request, ingest)))
    assert ingest.fallback is None
    whole_ids, whole_waveform, whole_finished = spoken(
        await drain(omni.generate(dataclasses.replace(request, request_id="spoken-whole")))
    )
    assert text_ids == whole_ids
    assert finished.usage == whole_finished.usage and finished.usage.audio_tokens > 0
    assert len(waveform) == len(whole_waveform)
    assert np.abs(waveform - whole_waveform).max() <= 1e-5 * max(np.abs(whole_waveform).max(), 1e-30) + 1e-7
    await assert_released(omni.thinker)


async def test_a_turn_dropped_before_it_ends_releases_the_thinker(thinker):
    """input_audio_buffer.clear, a VAD false start, a client gone mid-utterance: the turn is closed unended."""
    ingest = ThinkerIngest(thinker, "dropped", (SYSTEM,), hidden_states=True)
    await bounded(ingest.start())
    ingest.push_audio(tone(4.5))
    await bounded(ingest.wait_prefilled(2))
    assert ingest.prefilled_blocks == 2
    await bounded(ingest.close())
    await bounded(ingest.close())  # idempotent
    ingest.push_audio(tone(2.5))  # ignored once closed
    await assert_released(thinker)


async def test_an_answer_left_midway_releases_the_thinker(thinker):
    """response.cancel or a barge-in while the ingested turn's answer streams."""
    ingest = ThinkerIngest(thinker, "cancelled", (SYSTEM,), hidden_states=True)
    await bounded(ingest.start())
    ingest.push_audio(tone(3.0))
    answer = ingest.finish(turn_request("cancelled", (SYSTEM,), tone(3.0), Sampling(max_tokens=4000)))
    texts = 0
    while texts < 3:
        texts += isinstance(await bounded(anext(answer)), ThinkerText)
    await bounded(answer.aclose())
    await assert_released(thinker)


async def test_a_conversation_other_than_the_one_ingested_is_answered_as_sent(thinker):
    """The committed turn differs from what was ingested (an item added during speech, trimmed audio): the
    request is answered as given, and the session is released."""
    samples = tone(4.4, seed=6)
    ingest = ThinkerIngest(thinker, "changed", (SYSTEM,), hidden_states=True)
    await bounded(ingest.start())
    ingest.push_audio(samples)
    sampling = Sampling(max_tokens=MAX_TOKENS)
    request = turn_request("changed", (SYSTEM,), samples[1600:], sampling)
    events = await drain(ingest.finish(request))
    assert ingest.fallback == "the conversation is not the one ingested"
    assert_same_answer(summary(events), await at_once(thinker, "whole-changed", (SYSTEM,), samples[1600:], sampling))
    await assert_released(thinker)


async def test_stop_strings_fall_back_to_the_conversation_sent_at_once(thinker):
    """vLLM refuses stop strings on streaming input: the turn is answered whole, the same way."""
    samples = tone(2.5, seed=9)
    sampling = Sampling(max_tokens=MAX_TOKENS, stop=("never said",))
    streamed, _, _ = await ingested(thinker, "with-stop", (SYSTEM,), samples, sampling)
    assert_same_answer(streamed, await at_once(thinker, "whole-stop", (SYSTEM,), samples, sampling))
    await assert_released(thinker)
