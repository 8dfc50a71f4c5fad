"""The reference oracle on the tiny checkpoint: shapes, data flow, talker mask fix, injectable DiT noise."""

import numpy as np
import pytest
import torch
from oracle import SAMPLES_PER_CODE, SYSTEM_PROMPT, TALKER_EOS_IDS, Reference
from PIL import Image

TEXT_CONVERSATION = [
    {"role": "system", "content": SYSTEM_PROMPT},
    {"role": "user", "content": "Hello there, how are you?"},
]
MAX_NEW_TOKENS = 8
TALKER_MAX_NEW_TOKENS = 16  # a random talker may never emit codec eos


@pytest.fixture(scope="module")
def ref(reference: Reference) -> Reference:
    return reference


@pytest.fixture(scope="module")
def text_run(ref: Reference):
    return ref.generate(TEXT_CONVERSATION, max_new_tokens=MAX_NEW_TOKENS, talker_max_new_tokens=TALKER_MAX_NEW_TOKENS)


def test_text_prompt_gives_audio_of_matching_length(text_run):
    codes = text_run.talker_codes
    assert codes and not set(codes) & set(TALKER_EOS_IDS)
    assert text_run.mel.shape == (2 * len(codes), 80)
    assert text_run.waveform.shape == (len(codes) * SAMPLES_PER_CODE,)
    assert text_run.waveform.dtype == torch.float32
    assert text_run.dit_noise.shape == (1, 2 * len(codes), 80)
    assert text_run.talker_logits.shape[0] in (len(codes), len(codes) + 1)


def test_hidden_states_are_the_lm_head_inputs(ref: Reference, text_run):
    prompt_len, tokens = len(text_run.prompt_ids), text_run.thinker_tokens
    hidden = ref.model.config.thinker_config.text_config.hidden_size
    assert text_run.hidden_states.shape == (prompt_len + len(tokens) - 1, hidden)
    with torch.no_grad():
        logits = ref.model.thinker.lm_head(text_run.hidden_states[prompt_len - 1 :])
    assert logits.argmax(-1).tolist() == tokens


def test_thinker_stops_on_eos_and_the_talker_gets_text_eos_then_pad(ref: Reference, text_run):
    # The random thinker never says <|im_end|>; make one of its tokens the eos to exercise the stop.
    tokens = text_run.thinker_tokens
    stop = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    out = ref.generate(
        TEXT_CONVERSATION,
        max_new_tokens=MAX_NEW_TOKENS,
        talker_max_new_tokens=4,
        thinker_kwargs={"eos_token_id": [tokens[stop]]},
    )
    assert out.thinker_tokens == tokens[: stop + 1]
    prompt_len, n = len(out.prompt_ids), len(out.thinker_tokens)
    assert out.hidden_states.shape[0] == prompt_len + n - 1
    talker = ref.model.talker
    with torch.no_grad():
        embed = ref.model.thinker.get_input_embeddings()
        expected_reply = torch.cat(
            [
                out.hidden_states[prompt_len + 1 :] + embed(torch.tensor(out.thinker_tokens[1:-1])),
                embed(torch.tensor([talker.text_eos_token, talker.text_pad_token])),
            ]
        )
        spk_bos = ref.model.speaker_map["Chelsie"]["bos_token"]
        expected_prefill = torch.cat(
            [
                out.hidden_states[:prompt_len] + embed(torch.tensor(out.prompt_ids)),
                embed(torch.tensor([spk_bos])),
                out.hidden_states[prompt_len : prompt_len + 1] + embed(torch.tensor(out.thinker_tokens[:1])),
            ]
        )
    torch.testing.assert_close(out.talker_reply_part, expected_reply, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.talker_inputs_embeds, expected_prefill, rtol=0, atol=1e-6)


def _left_padded_talker_run(ref: Reference, out, steps: int) -> torch.Tensor:
    """transformers' talker on the same inputs left-padded by one: a real mask, which generate() keeps."""
    talker = ref.model.talker
    prompt_len = len(out.prompt_ids)
    spk_bos = ref.model.speaker_map["Chelsie"]["bos_token"]
    codec_ids = [talker.codec_mask_token] * prompt_len + [talker.codec_pad_token, talker.codec_bos_token]
    input_ids = torch.tensor([[talker.codec_pad_token, *codec_ids]])
    mask = torch.ones_like(input_ids)
    mask[0, 0] = 0
    embeds = torch.cat([torch.zeros(1, out.talker_inputs_embeds.shape[1]), out.talker_inputs_embeds])
    result = talker.generate(
        input_ids=input_ids,
        attention_mask=mask,
        inputs_embeds=embeds[None],
        input_text_ids=torch.tensor([[0, *out.prompt_ids, spk_bos, out.thinker_tokens[0]]]),
        thinker_reply_part=out.talker_reply_part[None],
        max_new_tokens=steps,
        do_sample=False,
        repetition_penalty=1.05,
        eos_token_id=list(TALKER_EOS_IDS),
        pad_token_id=talker.codec_pad_token,
        suppress_tokens=[talker.codec_bos_token],
        output_logits=True,
        return_dict_in_generate=True,
    )
    return torch.stack([step[0] for step in result.logits])


def test_talker_mask_fix_matches_a_left_padded_run(ref: Reference, text_run):
    padded = _left_padded_talker_run(ref, text_run, steps=text_run.talker_logits.shape[0])
    torch.testing.assert_close(text_run.talker_logits, padded, rtol=0, atol=1e-6)

    unfixed = ref.generate(
        TEXT_CONVERSATION, max_new_tokens=MAX_NEW_TOKENS, talker_max_new_tokens=1, fix_talker_mask=False
    )
    assert (unfixed.talker_logits[0] - padded[0]).abs().max() > 1e-3


def test_same_dit_noise_same_waveform_and_different_noise_differs(ref: Reference, text_run):
    codes = text_run.talker_codes
    replay = ref.code2wav(codes, noise=text_run.dit_noise)
    assert torch.equal(replay.waveform, text_run.waveform)
    assert torch.equal(replay.mel, text_run.mel)

    longer = torch.cat([text_run.dit_noise, torch.randn(1, 10, 80)], dim=1)  # only the first 2n frames count
    assert torch.equal(ref.code2wav(codes, noise=longer).waveform, text_run.waveform)

    other = ref.code2wav(codes, noise=torch.randn(1, 2 * len(codes), 80, generator=torch.Generator().manual_seed(7)))
    assert not torch.allclose(other.waveform, text_run.waveform)


def test_generate_takes_the_callers_dit_noise(ref: Reference, text_run):
    noise = torch.randn(1, 2 * TALKER_MAX_NEW_TOKENS, 80, generator=torch.Generator().manual_seed(11))
    out = ref.generate(
        TEXT_CONVERSATION,
        max_new_tokens=MAX_NEW_TOKENS,
        talker_max_new_tokens=TALKER_MAX_NEW_TOKENS,
        dit_noise=noise,
    )
    assert out.talker_codes == text_run.talker_codes
    assert torch.equal(out.dit_noise, noise[:, : 2 * len(out.talker_codes)])
    assert torch.equal(out.waveform, ref.code2wav(out.talker_codes, noise=noise).waveform)


def test_run_leaves_no_patches_and_no_rng_change(ref: Reference):
    state = torch.random.get_rng_state()
    out = ref.generate(TEXT_CONVERSATION, max_new_tokens=2, audio=False)
    assert out.talker_codes is None and out.waveform is None and out.hidden_states.shape[0] == len(out.prompt_ids) + 1
    assert torch.equal(torch.random.get_rng_state(), state)
    for module, name in [
        (ref.model.thinker, "generate"),
        (ref.model.talker, "generate"),
        (ref.model.talker, "prepare_inputs_for_generation"),
        (ref.model.token2wav.code2wav_dit_model, "sample"),
    ]:
        assert name not in vars(module)
    assert not ref.model.talker._forward_hooks


def _media_conversation(use_audio_in_video: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    video = {"type": "video", "video": rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)}
    if use_audio_in_video:
        video["video_audio"] = (0.1 * rng.standard_normal(32000)).astype(np.float32)
    parts = [
        {"type": "image", "image": Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))},
        {"type": "audio", "audio": (0.1 * rng.standard_normal(16000)).astype(np.float32)},
        video,
        {"type": "text", "text": "What is this?"},
    ]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": parts}]


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_media_prompt_runs_and_the_talker_sees_zeroed_media_embeddings(ref: Reference, use_audio_in_video: bool):
    conversation = _media_conversation(use_audio_in_video)
    out = ref.generate(conversation, max_new_tokens=4, talker_max_new_tokens=4, use_audio_in_video=use_audio_in_video)
    assert out.waveform.shape == (len(out.talker_codes) * SAMPLES_PER_CODE,)
    config = ref.model.config.thinker_config
    prompt = torch.tensor(out.prompt_ids)
    media = torch.isin(
        prompt, torch.tensor([config.audio_token_index, config.image_token_index, config.video_token_index])
    )
    assert set(prompt[media].tolist()) == {
        config.audio_token_index,
        config.image_token_index,
        config.video_token_index,
    }
    prompt_rows = out.talker_inputs_embeds[: len(prompt)]
    assert torch.equal(prompt_rows[media], out.hidden_states[: len(prompt)][media])


def test_sampled_talker_is_reproducible_from_its_seed(ref: Reference):
    def run(seed: int):
        return ref.generate(
            TEXT_CONVERSATION, max_new_tokens=3, talker_max_new_tokens=6, talker_do_sample=True, seed=seed
        )

    first, again = run(1), run(1)
    assert first.talker_codes == again.talker_codes
    assert torch.equal(first.waveform, again.waveform)
