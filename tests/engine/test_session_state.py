"""A session's turns reuse its earlier turns' thinker state (prefix cache under the session's salt, stored rows)
and answer exactly as the same conversation sent at once, salted alone: greedy tokens, positions and every
hidden-state row, after spoken turns, ingested turns (a restart in one), a truncated answer and a deleted item."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from released import assert_released
from thinker_cases import picture, tone

from omnitalk.engine.omni import AudioDelta, Finished, OmniEngine, OmniRequest, Speech
from omnitalk.engine.request import Audio, Image, Message, Sampling, Text, ThinkerRequest
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.engine.thinker.engine import ThinkerEngine, _sampling_params
from omnitalk.engine.thinker.events import HiddenStates, ThinkerDone, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.prompt import SPEECH_SYSTEM_PROMPT
from omnitalk.engine.thinker.session_request import keys_of, processed
from omnitalk.engine.thinker.streaming import ThinkerIngest

MAX_TOKENS = 10
HIDDEN_TOLERANCE = 1e-4  # as tests/engine/test_thinker.py
TIMEOUT = 180.0
SYSTEM = Message("system", (Text(SPEECH_SYSTEM_PROMPT),))


async def drain(stream) -> list:
    items = []
    while True:
        try:
            items.append(await asyncio.wait_for(anext(stream), TIMEOUT))
        except StopAsyncIteration:
            return items


@dataclasses.dataclass
class Answer:
    prompt_ids: list[int]
    positions: torch.Tensor
    tokens: list[int]
    rows: torch.Tensor
    done: ThinkerDone
    text: str


def answer(events) -> Answer:
    assert isinstance(events[0], ThinkerStart) and isinstance(events[-1], ThinkerDone)
    spans = [e for e in events if isinstance(e, HiddenStates)]
    assert [s.first_position for s in spans] == [0, *(s.first_position + len(s.rows) for s in spans[:-1])]
    texts = [e for e in events if isinstance(e, ThinkerText)]
    tokens = [t for e in texts for t in e.token_ids]
    rows = torch.cat([s.rows for s in spans]).float()
    return Answer(
        events[0].prompt_token_ids, events[0].positions, tokens, rows, events[-1], "".join(e.text for e in texts)
    )


async def ask(engine: ThinkerEngine, request_id: str, messages, session: str | None) -> Answer:
    request = ThinkerRequest(request_id, messages, Sampling(max_tokens=MAX_TOKENS), hidden_states=True, session=session)
    return answer(await drain(engine.generate(request)))


def assert_same(reused: Answer, alone: Answer) -> None:
    assert reused.prompt_ids == alone.prompt_ids
    assert torch.equal(reused.positions, alone.positions)
    assert reused.tokens == alone.tokens
    assert (
        reused.rows.shape == alone.rows.shape == (len(alone.prompt_ids) + len(alone.tokens) - 1, reused.rows.shape[1])
    )
    assert (reused.rows - alone.rows).abs().max().item() < HIDDEN_TOLERANCE


async def turn(engine: ThinkerEngine, name: str, messages, session: str) -> Answer:
    """The turn in the session, checked against the same conversation sent at once, salted alone."""
    reused = await ask(engine, f"{name}-session", messages, session)
    assert_same(reused, await ask(engine, f"{name}-alone", messages, None))
    return reused


def user_audio(seconds: float, seed: int) -> Message:
    return Message("user", (Audio(tone(seconds, hz=150.0 + 40 * seed, seed=seed)),))


async def test_later_turns_reuse_the_session_and_answer_as_sent_at_once(thinker):
    session = "sess-spoken"
    first = (SYSTEM, user_audio(3.1, 1))
    one = await turn(thinker, "t1", first, session)
    assert one.done.num_cached_tokens == 0
    second = (*first, Message("assistant", (Text(one.text),)), user_audio(4.4, 2))
    two = await turn(thinker, "t2", second, session)
    assert two.done.num_cached_tokens > len(one.prompt_ids) // 2  # the first turn, audio included, was reused
    third = (
        *second,
        Message("assistant", (Text(two.text),)),
        Message("user", (Text("And this?"),)),
        user_audio(2.2, 3),
    )
    three = await turn(thinker, "t3", third, session)
    assert three.done.num_cached_tokens > len(two.prompt_ids) // 2
    # a truncated answer (conversation.item.truncate): reused up to the cut, exact after it
    cut = (*second[:-2], Message("assistant", (Text(one.text[: len(one.text) // 2]),)), second[-1])
    truncated = await turn(thinker, "t-truncated", cut, session)
    assert 0 < truncated.done.num_cached_tokens < len(one.prompt_ids) + len(one.tokens)
    # a deleted item: the first user turn goes, so nothing but the system prompt is shared
    deleted = await turn(thinker, "t-deleted", (SYSTEM, *third[3:]), session)
    assert deleted.done.num_cached_tokens < len(one.prompt_ids)
    thinker.forget_session(session)
    assert thinker.sessions.get(session) is None


async def test_images_beside_block_audio_answer_as_sent_at_once(thinker):
    """With an image, a session's audio goes as samples (vLLM's processor takes no feature items beside images): still
    exact, and reused as long as no later clip is longer (the processor's padding enters the audio's hash)."""
    session = "sess-image"
    first = (SYSTEM, Message("user", (Image(picture(56, 56, seed=1)), Audio(tone(4.2, seed=11)))))
    one = await turn(thinker, "m1", first, session)
    second = (*first, Message("assistant", (Text(one.text),)), user_audio(2.0, 12))
    two = await turn(thinker, "m2", second, session)
    assert two.done.num_cached_tokens > len(one.prompt_ids) // 2
    thinker.forget_session(session)


PIECE = 1600  # 100 ms of audio per append, as a Realtime client sends it


async def ingest_turn(engine: ThinkerEngine, name: str, history, samples: np.ndarray, session: str, *,
                      salted: bool = True):  # fmt: skip
    """A spoken turn ingested 100 ms at a time under the session's salt, each block's prefill awaited (as real time
    would), checked against the same conversation sent at once, salted alone; returns the answer and the ingest."""
    ingest = ThinkerIngest(engine, name, history, hidden_states=True, session=session)
    await asyncio.wait_for(ingest.start(), TIMEOUT)
    for start in range(0, len(samples), PIECE):
        ingest.push_audio(samples[start : start + PIECE])
        await asyncio.wait_for(ingest.wait_prefilled(ingest.pushed_blocks), TIMEOUT)
    messages = (*history, Message("user", (Audio(samples),)))
    request = ThinkerRequest(name, messages, Sampling(max_tokens=MAX_TOKENS), hidden_states=True, session=session)
    events = await drain(ingest.finish(request))
    assert ingest.fallback is None  # answered from the ingest session
    reused = answer(events)
    assert_same(reused, await ask(engine, f"{name}-alone", messages, None))
    keys = tuple(await whole_keys(engine, messages, session)) if salted else None
    assert events[0].content_keys == keys
    return reused, ingest


async def whole_keys(engine: ThinkerEngine, messages, session: str) -> list[bytes]:
    """The content keys of the conversation sent at once as the session's request: equal to an ingested turn's only
    if its chunks' items are the very items a later turn sends (vLLM's item hashes)."""
    prompt = engine._render(ThinkerRequest("keys", messages, Sampling(), hidden_states=True, session=session), session)
    request = ThinkerRequest("keys", messages, Sampling(), hidden_states=True)
    core = await processed(engine.llm, "keys", {**prompt, "cache_salt": session}, _sampling_params(request))
    return keys_of(core)


def louder_and_louder() -> np.ndarray:
    """7 s whose second and third blocks are each louder than all before: the session restarts twice."""
    return np.concatenate([0.3 * tone(2.2, seed=1), 0.6 * tone(2.0, seed=3), tone(2.8, seed=2)])


async def test_every_ingested_turn_reuses_the_session_and_answers_as_sent_at_once(thinker):
    """Turns ingested under the session's salt: the head comes from the prefix cache and the stored rows (the earlier
    turns' audio included, which only ingest chunks computed), the turn's rows are stored for the next; a restart in
    a later turn is served its head by the cache; the turn sent at once after them reuses the last ingested one."""
    session = "sess-ingest"
    audio = thinker.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    one_audio = tone(6.3, hz=170.0, seed=4)
    one, _ = await ingest_turn(thinker, "i1", (SYSTEM,), one_audio, session)
    assert one.done.num_cached_tokens == 0
    history = (SYSTEM, Message("user", (Audio(one_audio),)), Message("assistant", (Text(one.text),)))
    two_audio = tone(4.3, hz=180.0, seed=5)
    two, _ = await ingest_turn(thinker, "i2", history, two_audio, session)
    assert two.done.num_cached_tokens > one.prompt_ids.index(audio)  # blocks computed by turn 1's chunks
    history = (*history, Message("user", (Audio(two_audio),)), Message("assistant", (Text(two.text),)))
    three_audio = louder_and_louder()
    three, ingest = await ingest_turn(thinker, "i3", history, three_audio, session)
    assert ingest.restarts == 2
    assert three.done.num_cached_tokens > len(two.prompt_ids) // 2
    fourth = (*history, Message("user", (Audio(three_audio),)), Message("assistant", (Text(three.text),)))
    four = await turn(thinker, "i4", (*fourth, user_audio(2.2, 7)), session)
    assert four.done.num_cached_tokens > len(three.prompt_ids) // 2
    assert thinker.num_open_streams == 0
    thinker.forget_session(session)


async def test_a_turn_after_an_image_is_ingested_salted_alone(thinker):
    """The head holds an image, whose processing vLLM's processor cache would take as sent to the EngineCore: the
    turn is ingested salted alone (its chunks not processed twice), and still answered from its ingest session."""
    session = "sess-image-ingest"
    first = (SYSTEM, Message("user", (Image(picture(56, 56, seed=2)), Audio(tone(2.4, seed=13)))))
    one = await turn(thinker, "mi1", first, session)
    history = (*first, Message("assistant", (Text(one.text),)))
    samples = tone(3.3, seed=14)
    samples *= np.linspace(1.0, 0.6, len(samples), dtype=np.float32)  # loudest in its first block: no clamp moves
    two, _ = await ingest_turn(thinker, "mi2", history, samples, session, salted=False)
    assert two.done.num_cached_tokens == 0
    thinker.forget_session(session)


@pytest.mark.parametrize("leave", ["close", "answer"])
async def test_a_later_ingested_turn_left_midway_releases_the_thinker(thinker, leave):
    """Clear, cancel or a client gone mid-utterance (closed) or mid-answer (left) in a session's second turn."""
    session = f"sess-leave-{leave}"
    one_audio = tone(3.1, seed=8)
    one, _ = await ingest_turn(thinker, f"l1-{leave}", (SYSTEM,), one_audio, session)
    history = (SYSTEM, Message("user", (Audio(one_audio),)), Message("assistant", (Text(one.text),)))
    ingest = ThinkerIngest(thinker, f"l2-{leave}", history, hidden_states=True, session=session)
    await asyncio.wait_for(ingest.start(), TIMEOUT)
    samples = tone(4.5, seed=9)
    ingest.push_audio(samples)
    await asyncio.wait_for(ingest.wait_prefilled(2), TIMEOUT)
    if leave == "close":
        await asyncio.wait_for(ingest.close(), TIMEOUT)
    else:
        messages = (*history, Message("user", (Audio(samples),)))
        request = ThinkerRequest("l2", messages, Sampling(max_tokens=4000), hidden_states=True, session=session)
        stream = ingest.finish(request)
        texts = 0
        while texts < 3:
            texts += isinstance(await asyncio.wait_for(anext(stream), TIMEOUT), ThinkerText)
        await asyncio.wait_for(stream.aclose(), TIMEOUT)
    thinker.forget_session(session)
    await assert_released(thinker)


async def test_a_session_whose_rows_are_gone_is_resent_alone(thinker):
    """vLLM still caches the prefix, the session's rows were dropped: the request is resent under a fresh salt."""
    session = "sess-forgotten"
    first = (SYSTEM, user_audio(6.0, 7))  # past one KV block (128 positions on CPU)
    one = await turn(thinker, "f1", first, session)
    thinker.forget_session(session)
    resent = thinker.num_resent
    second = (*first, Message("assistant", (Text(one.text),)), user_audio(2.0, 8))
    two = await turn(thinker, "f2", second, session)
    assert thinker.num_resent == resent + 1 and two.done.num_cached_tokens == 0
    assert thinker.num_open_streams == 0
    thinker.forget_session(session)


@pytest.mark.parametrize("session", ["sess-omni"])
async def test_a_spoken_second_turn_speaks_as_sent_at_once(omni: OmniEngine, session):
    """Through the talker and Code2Wav: the reused rows give the same codes and waveform."""
    speech = Speech("Chelsie", TalkerSampling(temperature=0.0, seed=0, max_tokens=120))

    async def speak(request_id: str, messages, salt: str | None):
        events = await drain(
            omni.generate(OmniRequest(request_id, messages, Sampling(max_tokens=8), speech, session=salt))
        )
        assert isinstance(events[-1], Finished)
        audio = [e.samples for e in events if isinstance(e, AudioDelta)]
        return events[-1].usage, np.concatenate(audio) if audio else np.zeros(0, np.float32)

    first = (SYSTEM, user_audio(5.0, 9))
    await speak("o1", first, session)
    second = (*first, Message("assistant", (Text("Yes."),)), user_audio(2.2, 10))
    usage, waveform = await speak("o2", second, session)
    alone_usage, alone = await speak("o2-alone", second, None)
    assert usage.cached_tokens > 0 and alone_usage.cached_tokens == 0
    assert dataclasses.replace(usage, cached_tokens=0) == alone_usage and usage.audio_tokens > 0
    assert len(waveform) == len(alone)
    assert np.abs(waveform - alone).max() <= 1e-5 * max(np.abs(alone).max(), 1e-30) + 1e-7
    omni.forget_session(session)
