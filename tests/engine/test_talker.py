"""The talker against transformers (the oracle): conditioning, TMRoPE, continuous batching, streaming, voices."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from oracle import SYSTEM_PROMPT, Reference, ReferenceOutput
from PIL import Image

from omnitalk.engine.talker import Talker, TalkerSampling, TalkerSequence
from omnitalk.engine.talker.positions import talker_positions

CODES = 40  # a random talker never says codec eos: every run stops at max tokens
GREEDY = TalkerSampling(temperature=0, max_tokens=CODES)
LOGITS_TOLERANCE = 1e-4


def tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def picture(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def clip(seconds: float, size: int = 112) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (int(seconds * 2), size, size, 3), dtype=np.uint8)


def conversation(*parts: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": list(parts)}]


TEXT = conversation({"type": "text", "text": "Hello there, how are you?"})
AUDIO = conversation({"type": "audio", "audio": tone(2.0)}, {"type": "text", "text": "What do you hear?"})
IMAGE = conversation({"type": "image", "image": picture(224, 112)}, {"type": "text", "text": "Describe it."})


@pytest.fixture(scope="module")
def runs(reference: Reference) -> dict[str, ReferenceOutput]:
    """Greedy talker runs; "short" stops the thinker after 3 tokens, so text_eos and text_pad come early."""
    return {
        "text": reference.generate(TEXT, max_new_tokens=8, talker_max_new_tokens=CODES),
        "short": reference.generate(TEXT, max_new_tokens=3, talker_max_new_tokens=CODES),
        "audio": reference.generate(AUDIO, max_new_tokens=6, talker_max_new_tokens=CODES),
        "image": reference.generate(IMAGE, max_new_tokens=5, talker_max_new_tokens=CODES),
    }


def rope_index(model, inputs: Mapping, use_audio_in_video: bool, ids: torch.Tensor | None = None):
    """transformers' `get_rope_index` of `model` (thinker or talker) for the processor's `inputs`, on their
    prompt ids or on `ids` [1, T]: positions [3, 1, T] and the rope delta [1, 1]."""
    ids = inputs["input_ids"] if ids is None else ids
    lengths = inputs.get("feature_attention_mask")
    return model.get_rope_index(
        ids,
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        torch.ones_like(ids),
        use_audio_in_video,
        None if lengths is None else lengths.sum(-1),
        inputs.get("video_second_per_grid"),
    )


def thinker_positions(reference: Reference, inputs: Mapping, use_audio_in_video: bool = False) -> torch.Tensor:
    """What the thinker announces for a prompt (ThinkerStart.positions, [3, L]), from transformers' thinker."""
    return rope_index(reference.model.thinker, inputs, use_audio_in_video)[0][:, 0]


def image_positions(reference: Reference) -> torch.Tensor:
    return thinker_positions(reference, reference.prompt_inputs(IMAGE))


@pytest.fixture(scope="module")
def talker(tiny_dir) -> Talker:
    return Talker.from_checkpoint(tiny_dir, max_seqs=8, memory_gib=0.01)


def sequence(out: ReferenceOutput, request_id: str = "r", feed: bool = True, **kwargs) -> TalkerSequence:
    """A sequence for the oracle run's prompt; `feed`: with the whole thinker stream already in."""
    seq = TalkerSequence(request_id, out.prompt_ids, **{"sampling": GREEDY, **kwargs})
    if feed:
        seq.add_rows(0, out.hidden_states)
        seq.add_tokens(out.thinker_tokens)
        seq.thinker_done()
    return seq


def run_alone(talker: Talker, seq: TalkerSequence, add: bool = True) -> list[int]:
    if add:
        talker.add(seq)
    while not seq.finished:
        talker.step([seq])
    return seq.codes


@pytest.mark.parametrize("name", ["text", "short", "audio", "image"])
def test_greedy_codes_and_logits_equal_transformers(talker: Talker, reference: Reference, runs, name: str):
    out = runs[name]
    seq = sequence(out, positions=image_positions(reference) if name == "image" else None)
    talker.add(seq)
    logits = []
    while not seq.finished:
        talker.step([seq])
        logits.append(talker.last_logits[0])
    assert seq.codes == out.talker_codes
    assert seq.finish_reason == "length" and seq.slot is None
    assert (seq.rope_delta != 0) == (name == "image")
    torch.testing.assert_close(logits[0], out.talker_logits[0], rtol=0, atol=LOGITS_TOLERANCE)
    torch.testing.assert_close(torch.stack(logits), out.talker_logits, rtol=0, atol=LOGITS_TOLERANCE)


def test_continuous_batching_equals_each_run_alone(talker: Talker, runs):
    plan = [  # (admitted at step, run, settings): a slot gap, two prefills at once, prefills beside decodes
        (0, "text", {}),
        (0, "short", {"sampling": TalkerSampling(temperature=0, max_tokens=6)}),
        (3, "audio", {"sampling": TalkerSampling(seed=1, max_tokens=CODES), "speaker": "Ethan"}),
        (3, "text", {"sampling": TalkerSampling(seed=2, max_tokens=CODES)}),
        (12, "short", {"sampling": TalkerSampling(seed=5, top_k=0, top_p=1.0, max_tokens=CODES)}),
    ]
    alone = [run_alone(talker, sequence(runs[name], **settings)) for _, name, settings in plan]
    batched = [sequence(runs[name], f"r{i}", **settings) for i, (_, name, settings) in enumerate(plan)]
    live: list[TalkerSequence] = []
    step = 0
    while step == 0 or live:
        for (admit, _, _), seq in zip(plan, batched, strict=True):
            if admit == step:
                talker.add(seq)
                live.append(seq)
        assert None not in talker.step([seq for seq in live if seq.ready])
        live = [seq for seq in live if not seq.finished]
        step += 1
    assert [seq.codes for seq in batched] == alone
    assert alone[0] == runs["text"].talker_codes and len(alone[1]) == 6


def test_streaming_equals_feeding_everything_up_front(talker: Talker, runs):
    """The thinker's stream, step by step: chunked prompt rows, then one token and one fed-back row per step."""
    out = runs["text"]
    prompt_len, tokens, rows = len(out.prompt_ids), out.thinker_tokens, out.hidden_states
    seq = sequence(out, feed=False, positions=torch.arange(prompt_len).expand(3, -1))  # as ThinkerStart has them
    talker.add(seq)
    events: list[tuple[str, object]] = [("rows", (p, rows[p : p + 16])) for p in range(0, prompt_len, 16)]
    for k, token in enumerate(tokens):
        # the fed-back row of g_{k-1} and the new token g_k come from one thinker step, in either order
        pair = [("rows", (prompt_len + k - 1, rows[prompt_len + k - 1 : prompt_len + k]))] if k else []
        pair.insert(k % 2, ("tokens", [token]))
        events += pair
    events.append(("done", None))
    for kind, payload in events:
        if kind == "rows":
            seq.add_rows(*payload)
        elif kind == "tokens":
            seq.add_tokens(payload)
        else:
            seq.thinker_done()
        while seq.ready:
            assert talker.step([seq])[0] is not None
        if not seq.thinker_finished:  # step j needs g_j fed back: the talker trails the thinker by one token
            assert len(seq.codes) == max(0, min(seq.num_rows - prompt_len, len(seq.tokens)))
    run_alone(talker, seq, add=False)
    assert seq.codes == out.talker_codes


def test_readiness_and_row_bookkeeping(talker: Talker, runs):
    out = runs["text"]
    prompt_len = len(out.prompt_ids)
    seq = sequence(out, feed=False)
    assert not seq.ready
    seq.add_rows(0, out.hidden_states[:prompt_len])
    seq.add_tokens(out.thinker_tokens[:1])
    assert not seq.ready  # g0 generated but not fed back yet
    with pytest.raises(ValueError, match="position"):
        seq.add_rows(prompt_len + 1, out.hidden_states[prompt_len + 1 :])  # a gap
    seq.add_rows(prompt_len - 2, out.hidden_states[prompt_len - 2 : prompt_len + 1])  # re-sent rows are skipped
    assert seq.num_rows == prompt_len + 1 and seq.ready
    with pytest.raises(ValueError, match="not added"):
        talker.step([seq])
    talker.add(seq)
    talker.step([seq])
    assert not seq.ready  # needs g1's row and g1
    seq.add_tokens(out.thinker_tokens[1:2])
    assert not seq.ready
    with pytest.raises(ValueError, match="not ready"):
        talker.step([seq])
    seq.add_rows(prompt_len + 1, out.hidden_states[prompt_len + 1 : prompt_len + 2])
    assert seq.ready
    talker.free(seq)
    assert seq.finish_reason == "abort" and not seq.ready


def test_voices_differ_and_unknown_voice_is_rejected(talker: Talker, runs):
    chelsie = run_alone(talker, sequence(runs["text"], speaker="Chelsie"))
    ethan = run_alone(talker, sequence(runs["text"], speaker="Ethan"))
    assert chelsie == runs["text"].talker_codes and ethan != chelsie
    with pytest.raises(ValueError, match=r"'Nobody'.*Chelsie.*Ethan"):
        talker.add(sequence(runs["text"], speaker="Nobody"))


def test_seeded_sampling_is_reproducible_and_seeds_differ(talker: Talker, runs):
    def codes(seed: int) -> list[int]:
        return run_alone(talker, sequence(runs["audio"], sampling=TalkerSampling(seed=seed, max_tokens=CODES)))

    first = codes(7)
    assert codes(7) == first and codes(8) != first
    assert first != runs["audio"].talker_codes


def test_stop_code_and_max_tokens(talker: Talker, runs):
    greedy = runs["text"].talker_codes
    at = next(i for i in range(3, len(greedy)) if greedy[i] not in greedy[:i])
    seq = sequence(runs["text"], sampling=TalkerSampling(temperature=0, stop_codes=(greedy[at],)))
    talker.add(seq)
    returned = [talker.step([seq])[0] for _ in range(at + 1)]
    assert returned == [*greedy[:at], None] and seq.codes == greedy[:at]
    assert seq.finish_reason == "stop" and seq.slot is None
    capped = sequence(runs["text"], sampling=TalkerSampling(temperature=0, max_tokens=5))
    assert run_alone(talker, capped) == greedy[:5] and capped.finish_reason == "length"


def test_a_thinker_that_says_one_token_leaves_nothing_to_say(runs):
    out = runs["text"]
    seq = TalkerSequence("r", out.prompt_ids)
    seq.add_rows(0, out.hidden_states[: len(out.prompt_ids)])
    seq.add_tokens(out.thinker_tokens[:1])
    seq.thinker_done()
    assert seq.finished and seq.finish_reason == "empty" and not seq.ready


def test_free_releases_the_slot_idempotently(tiny_dir, runs):
    talker = Talker.from_checkpoint(tiny_dir, max_seqs=2, memory_gib=0.01)
    a, b, c = (sequence(runs["text"], name) for name in "abc")
    talker.add(a)
    talker.add(b)
    with pytest.raises(RuntimeError, match="slots"):
        talker.add(c)
    talker.step([a, b])
    talker.free(a)
    talker.free(a)
    assert a.slot is None and a.finish_reason == "abort" and talker.num_free_slots == 1
    with pytest.raises(ValueError, match="finished"):
        talker.step([a])
    assert talker.step([]) == []
    talker.add(c)
    assert c.slot is not None and talker.num_free_slots == 0
    assert run_alone(talker, c, add=False) == runs["text"].talker_codes  # the reused slot starts clean
    with pytest.raises(ValueError, match="already added"):
        talker.add(a)


PROMPTS = {  # (user parts, use_audio_in_video)
    "text": ([{"type": "text", "text": "hi"}], False),
    "audio": ([{"type": "audio", "audio": tone(3.0)}, {"type": "text", "text": "hi"}], False),
    "image-and-video": (
        [
            {"type": "image", "image": picture(340, 150)},
            {"type": "video", "video": clip(3.0)},
            {"type": "audio", "audio": tone(1.1)},
            {"type": "text", "text": "hi"},
        ],
        False,
    ),
    "audio-in-video-short-soundtrack": (
        [{"type": "video", "video": clip(4.0), "video_audio": tone(2.7)}, {"type": "text", "text": "hi"}],
        True,
    ),
    "audio-in-video-many-chunks": (
        [{"type": "video", "video": clip(9.0), "video_audio": tone(9.3)}, {"type": "text", "text": "hi"}],
        True,
    ),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_talker_positions_equal_the_talkers_get_rope_index(reference: Reference, name: str):
    """The thinker's prompt positions, extended by [speaker bos, g0], are the positions and delta that
    transformers' talker uses."""
    parts, use_audio_in_video = PROMPTS[name]
    inputs = reference.prompt_inputs([{"role": "user", "content": parts}], use_audio_in_video=use_audio_in_video)
    prompt = inputs["input_ids"]
    ids = torch.cat([prompt, torch.tensor([[151872, 1234]])], dim=1)  # + [speaker bos, g0]
    expected, delta = rope_index(reference.model.talker, inputs, use_audio_in_video, ids)
    positions, our_delta = talker_positions(thinker_positions(reference, inputs, use_audio_in_video), prompt.shape[1])
    assert torch.equal(positions, expected[:, 0]) and our_delta == int(delta)
    assert (our_delta != 0) == (name not in ("text", "audio"))
    if name in ("text", "audio"):  # None: 1-D, as ThinkerStart may leave them for text and audio prompts
        assert torch.equal(talker_positions(None, prompt.shape[1])[0], positions)
    with pytest.raises(ValueError, match="do not match"):
        talker_positions(positions, prompt.shape[1])
