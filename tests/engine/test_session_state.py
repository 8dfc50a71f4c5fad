"""A session's turns reuse its earlier turns' thinker state (prefix cache under the session's salt, stored rows)
and answer exactly as the same conversation sent at once, salted alone: greedy tokens, positions and every
hidden-state row, after spoken turns, an ingested turn, a truncated answer and a deleted item."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from thinker_cases import picture, tone

from omnitalk.engine.omni import AudioDelta, Finished, OmniEngine, OmniRequest, Speech
from omnitalk.engine.request import Audio, Image, Message, Sampling, Text, ThinkerRequest
from omnitalk.engine.talker.sampling import TalkerSampling
from omnitalk.engine.thinker.engine import ThinkerEngine
from omnitalk.engine.thinker.events import HiddenStates, ThinkerDone, ThinkerStart, ThinkerText
from omnitalk.engine.thinker.prompt import SPEECH_SYSTEM_PROMPT
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


async def test_turns_after_an_ingested_turn_answer_as_sent_at_once(thinker):
    """A turn answered from its ingest session (salted alone) leaves nothing in the session's state, so the next turn
    recomputes it, exactly; the turn after that reuses the session again."""
    session = "sess-ingest"
    first = (SYSTEM, user_audio(2.6, 4))
    one = await turn(thinker, "i1", first, session)
    history = (*first, Message("assistant", (Text(one.text),)))
    samples = tone(4.3, hz=180.0, seed=5)
    ingest = ThinkerIngest(thinker, "i2", history, hidden_states=True)
    await asyncio.wait_for(ingest.start(), TIMEOUT)
    ingest.push_audio(samples)
    second = (*history, Message("user", (Audio(samples),)))
    request = ThinkerRequest("i2", second, Sampling(max_tokens=MAX_TOKENS), hidden_states=True, session=session)
    two = answer(await drain(ingest.finish(request)))
    assert ingest.fallback is None  # answered from the ingest session
    assert_same(two, await ask(thinker, "i2-alone", second, None))
    third = (*second, Message("assistant", (Text(two.text),)), user_audio(2.0, 6))
    three = await turn(thinker, "i3", third, session)
    fourth = (*third, Message("assistant", (Text(three.text),)), user_audio(2.2, 7))
    four = await turn(thinker, "i4", fourth, session)
    assert four.done.num_cached_tokens > len(three.prompt_ids) // 2
    thinker.forget_session(session)


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
    omni.thinker.forget_session(session)
