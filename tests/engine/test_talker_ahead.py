"""The talker's prefill ahead: the blocks of a prompt prefilled while its rows stream in (before its request exists)
are the ones the request's own prefill would write, so the request speaks as transformers and as a full prefill do."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from oracle import SYSTEM_PROMPT, Reference, ReferenceOutput
from talker_inputs import AUDIO_ID, Conversation, pool_gib, run, synthetic
from thinker_cases import tone

from omnitalk.codecs.code2wav import Code2Wav
from omnitalk.engine.speech.engine import AudioChunk, SpeechDone, SpeechEngine
from omnitalk.engine.talker import Talker, TalkerSampling, TalkerSequence
from omnitalk.engine.talker.ahead import AheadPrompt, PromptPart
from omnitalk.engine.talker.runner import BLOCK_SIZE
from omnitalk.engine.thinker.conversation import extend_keys

CODES = 30
LOGITS_TOLERANCE = 1e-4  # as the talker's own oracle tests


def spoken(seconds: float) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "audio", "audio": tone(seconds)}]}]  # fmt: skip


@pytest.fixture(scope="module")
def runs(reference: Reference) -> dict[str, ReferenceOutput]:
    return {
        "1.3s": reference.generate(spoken(1.3), max_new_tokens=6, talker_max_new_tokens=CODES),
        "2.6s": reference.generate(spoken(2.6), max_new_tokens=6, talker_max_new_tokens=CODES),
    }


@pytest.fixture
def talker(tiny_dir) -> Talker:
    return Talker.from_checkpoint(tiny_dir, max_seqs=4, memory_gib=pool_gib(8192))


def part(conv: Conversation, start: int, end: int) -> PromptPart:
    """Positions start..end-1 of a synthetic conversation (audio placeholders: their rows are the whole input)."""
    return PromptPart(start, [AUDIO_ID] * (end - start), conv.positions[:, start:end], conv.keys[start:end],
                      conv.rows[start:end])  # fmt: skip


def streamed_ahead(talker: Talker, ids, keys, positions, rows, known: int, pieces: list[int]) -> AheadPrompt:
    """The first `known` positions streamed in `pieces` (sizes; repeated over), one ahead round of one block after
    each piece, then rounds until nothing is left: as the speech engine's idle rounds do."""
    ahead = AheadPrompt("ingest", "s")
    first, k = 0, 0
    while first < known:
        end = min(known, first + pieces[k % len(pieces)])
        ahead.extend(PromptPart(first, ids[first:end], positions[:, first:end], keys[first:end], rows[first:end]))
        talker.prefill_ahead(ahead, max_blocks=1)
        first, k = end, k + 1
    while ahead.num_done < ahead.num_blocks(BLOCK_SIZE):
        assert talker.prefill_ahead(ahead, max_blocks=1) == 1
    return ahead


def answer(out: ReferenceOutput, name: str, session: str | None, keys) -> TalkerSequence:
    length = len(out.prompt_ids)
    seq = TalkerSequence(name, out.prompt_ids, sampling=TalkerSampling(temperature=0, max_tokens=CODES),
                         positions=torch.arange(length).expand(3, -1), session=session,
                         content_keys=keys if session is not None else None)  # fmt: skip
    seq.add_rows(0, out.hidden_states)
    seq.add_tokens(out.thinker_tokens)
    seq.thinker_done()
    return seq


@pytest.mark.parametrize("name", ["1.3s", "2.6s"])
def test_a_prompt_prefilled_ahead_speaks_as_transformers_and_as_a_full_prefill(talker: Talker, runs, name: str):
    out = runs[name]
    length = len(out.prompt_ids)
    assert length % BLOCK_SIZE  # the last partial block is the request's own
    keys = tuple(extend_keys([], out.prompt_ids))
    positions = torch.arange(length).expand(3, -1)
    known = length - 9  # the tail (the end of the turn and the assistant prefix) comes with the request
    ahead = streamed_ahead(talker, out.prompt_ids, keys, positions, out.hidden_states, known, [7, 45, 20])
    blocks = known // BLOCK_SIZE
    assert ahead.num_done == blocks and talker.num_ahead_tokens == blocks * BLOCK_SIZE
    assert talker.blocks.num_cached_blocks == blocks and talker.num_free_tokens == talker.blocks.num_tokens

    seq = answer(out, "answer", "s", keys)
    logits = run(talker, seq)[0]
    assert seq.num_prefix_tokens == blocks * BLOCK_SIZE
    assert seq.codes == out.talker_codes
    torch.testing.assert_close(logits, out.talker_logits[: len(logits)], rtol=0, atol=LOGITS_TOLERANCE)
    whole = answer(out, "whole", None, keys)
    whole_logits = run(talker, whole)[0]
    assert whole.num_prefix_tokens == 0 and whole.codes == seq.codes
    torch.testing.assert_close(logits, whole_logits, rtol=0, atol=1e-5)
    assert talker.num_free_tokens == talker.blocks.num_tokens


def test_ahead_over_a_cached_history_with_3d_positions_and_a_whole_number_of_blocks(talker: Talker):
    """The session's earlier turn left its prompt cached; the next turn's prompt (192 = 6 blocks, 3-D positions) is
    prefilled ahead past it, a round at a time, and the answer takes all 6 blocks and speaks as a full prefill."""
    conv = Conversation("conv", 400, 11)
    run(talker, conv.turn("t1", 100, 4))  # 3 blocks cached
    ahead = AheadPrompt("ingest", "s")
    ahead.extend(part(conv, 0, 150))
    assert talker.prefill_ahead(ahead, max_blocks=1) == 1 and ahead.num_done == 4
    ahead.extend(part(conv, 120, 192))  # 30 of them known already
    assert ahead.num_tokens == 192
    assert talker.prefill_ahead(ahead, max_blocks=4) == 2 and ahead.num_done == 6
    assert talker.prefill_ahead(ahead, max_blocks=4) == 0 and talker.num_ahead_tokens == 3 * BLOCK_SIZE
    second = conv.turn("t2", 192, 12)
    logits = run(talker, second)[0]
    assert second.num_prefix_tokens == 192
    whole = conv.turn("t2-whole", 192, 12, session=None)
    torch.testing.assert_close(logits, run(talker, whole)[0], rtol=0, atol=1e-5)
    assert second.codes == whole.codes


def test_ahead_takes_no_blocks_live_streams_need_and_checks_its_input(tiny_dir):
    talker = Talker.from_checkpoint(tiny_dir, max_seqs=4, memory_gib=pool_gib(8 * BLOCK_SIZE))
    conv = Conversation("conv", 300, 12)
    live = conv.turn("live", 100, 150, session=None)  # reserves 251 tokens: all 8 blocks
    talker.add(live)
    ahead = AheadPrompt("ingest", "s")
    ahead.extend(part(conv, 0, 64))
    assert talker.prefill_ahead(ahead, max_blocks=2) == 0 and ahead.num_done == 2  # waits for more of the prompt
    talker.free(live)
    ahead.extend(part(conv, 64, 96))
    assert talker.prefill_ahead(ahead, max_blocks=8) == 3 and talker.blocks.num_cached_blocks == 3
    with pytest.raises(ValueError, match="only 96 known"):
        ahead.extend(part(conv, 100, 101))
    with pytest.raises(ValueError, match="2 ids with 1 keys"):
        PromptPart(96, [1, 2], conv.positions[:, :2], conv.keys[:1], conv.rows[:2])
    assert talker.num_free_tokens == talker.blocks.num_tokens


def test_the_speech_engine_prefills_ahead_only_when_no_stream_can_progress(tiny_dir):
    """A stream fed whole can progress every round until its end: the prompts sent ahead after it wait until it
    is done (every audio chunk goes out before any block is prefilled ahead); a cancelled one is never prefilled."""
    talker = Talker.from_checkpoint(tiny_dir, max_seqs=4, memory_gib=pool_gib(8192))
    engine = SpeechEngine(talker, Code2Wav.from_checkpoint(tiny_dir), max_batch=4)
    ahead_at_audio: list[int] = []
    done = threading.Event()

    def sink(event) -> None:  # on the speech thread
        if isinstance(event, AudioChunk):
            ahead_at_audio.append(talker.num_ahead_tokens)
        else:
            done.set()

    try:
        live = synthetic("live", 40, 60)
        engine.open("live", live.prompt_ids, None, "Chelsie", live.sampling, sink)
        engine.add_rows("live", 0, live.take_prefill()[0])
        engine.add_rows("live", 41, live._take(live.num_rows - 41))
        engine.add_tokens("live", live.tokens)
        engine.thinker_done("live")
        conv, other = Conversation("conv", 300, 13), Conversation("other", 300, 14)
        for key, session, c in [("cancelled", "gone", other), ("kept", "s", conv)]:
            engine.prefill_ahead(key, session, part(c, 0, 100))
        engine.cancel_ahead("cancelled")
        assert done.wait(timeout=120)
        for _ in range(200):  # polled: the speech thread prefills once idle
            if talker.num_ahead_tokens:
                break
            time.sleep(0.05)
        assert len(ahead_at_audio) > 1 and set(ahead_at_audio) == {0}
        assert talker.num_ahead_tokens == 3 * BLOCK_SIZE and talker.blocks.num_cached_blocks == 3  # "kept"'s only
        assert talker.num_free_tokens == talker.blocks.num_tokens
    finally:
        engine.shutdown()


def test_nothing_held_when_a_session_is_forgotten_caches_under_it_later(tiny_dir):
    """The session's stream is open but not prefilled (its rows come after the forget) and a prompt of it is sent
    ahead: neither registers a block under the forgotten session, and the stream is still spoken whole."""
    talker = Talker.from_checkpoint(tiny_dir, max_seqs=4, memory_gib=pool_gib(8192))
    engine = SpeechEngine(talker, Code2Wav.from_checkpoint(tiny_dir), max_batch=4)
    events, done = [], threading.Event()

    def sink(event) -> None:  # on the speech thread
        events.append(event)
        if not isinstance(event, AudioChunk):
            done.set()

    try:
        conv, prompt_len, codes = Conversation("conv", 300, 15), 100, 20
        sampling = TalkerSampling(temperature=0.0, max_tokens=codes)
        engine.open("answer", [AUDIO_ID] * prompt_len, conv.positions[:, :prompt_len], "Chelsie", sampling, sink,
                    session="gone", content_keys=conv.keys[:prompt_len])  # fmt: skip
        engine.prefill_ahead("ingest", "gone", part(conv, 0, 200))
        engine.forget_session("gone")
        engine.add_rows("answer", 0, conv.rows[: prompt_len + codes])
        engine.add_tokens("answer", list(range(1000, 1001 + codes)))
        engine.thinker_done("answer")
        assert done.wait(timeout=120)
        assert isinstance(events[-1], SpeechDone) and events[-1].num_codes > 0
        assert talker.blocks.num_session_blocks("gone") == 0 and talker.blocks.num_cached_blocks == 0
    finally:
        engine.shutdown()
