"""The talker's KV pool: blocks and reservations, sizing from a memory budget, long prompts, full and impossible."""

from __future__ import annotations

import pytest
import torch
from talker_inputs import pool_gib, synthetic

from omnitalk.engine.talker import Talker, TalkerSequence
from omnitalk.engine.talker.block_manager import BlockManager
from omnitalk.engine.talker.model import Context
from omnitalk.engine.talker.model_runner import default_memory_gib, kv_bytes_per_token
from omnitalk.engine.talker.positions import talker_positions
from omnitalk.engine.talker.runner import BLOCK_SIZE


def run_alone(talker: Talker, seq: TalkerSequence) -> list[int]:
    talker.add(seq)
    while not seq.finished:
        talker.step([seq])
    return seq.codes


@pytest.fixture(scope="module")
def talker(tiny_dir) -> Talker:
    return Talker.from_checkpoint(tiny_dir, max_seqs=4, memory_gib=pool_gib(16384))


def test_block_manager_reserves_then_hands_out_blocks():
    blocks = BlockManager(num_blocks=4, block_size=8)
    a, b = TalkerSequence("a", [1]), TalkerSequence("b", [1])
    blocks.reserve(a, 17)  # 3 blocks
    assert blocks.num_free_tokens == 8 and not blocks.can_reserve(9) and blocks.can_reserve(8)
    with pytest.raises(RuntimeError, match="8 free tokens, 9 are needed"):
        blocks.reserve(b, 9)
    blocks.append(a, 9)
    assert len(a.block_table) == 2
    blocks.append(a, 16)
    assert len(a.block_table) == 2  # still fits
    blocks.append(a, 17)
    with pytest.raises(RuntimeError, match="outgrew"):
        blocks.append(a, 25)
    assert len(set(a.block_table)) == 3
    blocks.free(a)
    blocks.free(a)
    assert blocks.num_free_tokens == 32 and a.block_table == [] and a.num_reserved_blocks == 0
    blocks.reserve(b, 32)
    blocks.append(b, 32)
    assert sorted(b.block_table) == [0, 1, 2, 3]


def test_the_pool_is_sized_from_the_budget_in_the_models_dtype(tiny_dir):
    fp32 = Talker.from_checkpoint(tiny_dir, max_seqs=2, memory_gib=0.01)
    assert kv_bytes_per_token(fp32.model) == 512
    assert fp32.blocks.num_blocks == int(0.01 * 2**30 // (512 * BLOCK_SIZE))
    assert fp32.runner.pool.dtype == torch.float32
    assert fp32.runner.pool.shape == (2, 2, fp32.blocks.num_blocks + 1, BLOCK_SIZE, 1, 32)  # + the scratch block
    bf16 = Talker.from_checkpoint(tiny_dir, dtype=torch.bfloat16, max_seqs=2, memory_gib=0.01)
    assert bf16.runner.pool.dtype == torch.bfloat16 and bf16.blocks.num_blocks == 2 * fp32.blocks.num_blocks
    assert default_memory_gib(torch.device("cpu")) == 1.0
    assert fp32.max_seq_len == 32768  # the talker's max_position_embeddings when no context is given
    with pytest.raises(ValueError, match="holds no"):
        Talker.from_checkpoint(tiny_dir, memory_gib=pool_gib(BLOCK_SIZE - 1))


def test_a_prompt_longer_than_4096_positions_gets_its_whole_answer(talker: Talker):
    """Decode over the pool's blocks gives what dense causal attention over the whole sequence gives."""
    prompt_len, codes = 4500, 24
    seq = synthetic("long", prompt_len, codes)
    logits = []
    talker.add(seq)
    while not seq.finished:
        talker.step([seq])
        logits.append(talker.last_logits[0])
    assert len(seq.codes) == codes and seq.finish_reason == "length"
    dense = dense_logits(talker, synthetic("long", prompt_len, codes), seq.codes)
    torch.testing.assert_close(torch.stack(logits), dense, rtol=0, atol=2e-6)  # observed 2.4e-7


def dense_logits(talker: Talker, seq: TalkerSequence, codes: list[int]) -> torch.Tensor:
    """Logits of every step, teacher-forced with `codes` in one causal forward over a throwaway pool."""
    model, c = talker.model, talker.config
    prompt_len = len(seq.prompt_ids)
    with torch.inference_mode():
        prefill = talker.runner._prefill_embeds(seq)
        text = torch.stack([seq.take_decode(c.text_eos_id, c.text_pad_id)[0] for _ in codes[1:]])
        text = text + model.text_embed(torch.tensor(seq.tokens[1 : len(codes)]))
        embeds = torch.cat([prefill, model.model.embed_tokens(torch.tensor(codes[:-1])) + text])[None]
        n = embeds.shape[1]
        positions = torch.cat([talker_positions(None, prompt_len)[0], torch.arange(prompt_len + 2, n).expand(3, -1)], 1)
        scratch = torch.zeros(c.num_layers, 2, 1, n, c.num_kv_heads, c.head_dim)
        hidden = model(embeds, positions[:, None], scratch, Context(write=torch.arange(n), valid=torch.arange(n)))
        return model.codec_head(hidden[0, prompt_len + 1 :]).float()


def test_long_and_short_sequences_batched_equal_each_alone(talker: Talker):
    plan = [("long", 4200, 0), ("short", 30, 1), ("mid", 700, 2)]
    alone = [run_alone(talker, synthetic(name, n, 20, seed)) for name, n, seed in plan]
    batch = [synthetic(name, n, 20, seed) for name, n, seed in plan]
    for seq in batch:
        talker.add(seq)
    while not all(seq.finished for seq in batch):
        talker.step([seq for seq in batch if not seq.finished])
    assert [seq.codes for seq in batch] == alone


def test_a_full_pool_turns_streams_away_until_tokens_are_released(talker: Talker):
    first, second = synthetic("first", 6000, 12), synthetic("second", 6000, 12)
    assert talker.num_tokens_needed(first) == 6013 and talker.num_free_tokens == 16384
    talker.add(first)
    talker.add(second)
    third = synthetic("third", 6000, 12)
    assert not talker.can_add(third) and talker.num_free_slots == 2  # slots are free, tokens are not
    with pytest.raises(RuntimeError, match="free tokens"):
        talker.add(third)
    while not first.finished:
        talker.step([first])
    assert talker.can_add(third)
    talker.free(second)
    assert run_alone(talker, third) == first.codes
    assert talker.num_free_tokens == 16384


def test_a_stream_that_can_never_fit_is_rejected_with_its_reason(talker: Talker):
    huge = synthetic("huge", 100, 20_000)
    with pytest.raises(ValueError, match=r"may need 20101 tokens .* whole pool of 16384: raise talker_memory_gib"):
        talker.check(huge)
    with pytest.raises(ValueError, match="whole pool"):
        talker.add(huge)
    assert talker.num_free_tokens == 16384 and huge.slot is None


def test_the_context_window_bounds_a_stream_not_a_fixed_cache(tiny_dir):
    talker = Talker.from_checkpoint(tiny_dir, max_seqs=2, memory_gib=pool_gib(16384), max_seq_len=5000)
    with pytest.raises(ValueError, match="4999 tokens leaves no room to speak in the talker's 5000-token context"):
        talker.check(synthetic("too-long", 4999, 4))
    seq = synthetic("at-the-edge", 4980, 100)
    assert talker.num_tokens_needed(seq) == 5000
    run_alone(talker, seq)
    assert len(seq.codes) == 5000 - (4980 + 2) + 1 and seq.finish_reason == "length"
