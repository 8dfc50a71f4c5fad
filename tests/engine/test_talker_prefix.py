"""Talker prefix caching: a session's later turn takes its earlier turns' prompt blocks from the pool and speaks as a
full prefill does; cached blocks are shared by reference, evicted least recently used, and dropped with the session."""

from __future__ import annotations

import pytest
import torch
from talker_inputs import Conversation, pool_gib, run

from omnitalk.engine.talker import Talker, TalkerSequence
from omnitalk.engine.talker.block_manager import BlockManager, block_hashes
from omnitalk.engine.talker.runner import BLOCK_SIZE

LOGITS_TOLERANCE = 1e-5  # cached prefix vs full prefill, fp32


@pytest.fixture
def talker(tiny_dir) -> Talker:
    return Talker.from_checkpoint(tiny_dir, max_seqs=4, memory_gib=pool_gib(16384))


def test_a_cached_prefix_speaks_as_a_full_prefill_batched_beside_an_uncached_one(talker: Talker):
    conv, other = Conversation("conv", 600, 0), Conversation("other", 200, 1)
    first = conv.turn("t1", 192, 6)  # six full blocks: the whole prompt is cacheable
    run(talker, first)
    assert first.num_prefix_tokens == 0 and talker.blocks.num_cached_blocks == 6
    assert talker.num_free_tokens == 16384  # cached blocks nobody holds count as free
    second, beside = conv.turn("t2", 330, 20), other.turn("beside", 100, 20, session=None)
    cached = run(talker, second, beside)
    assert second.num_prefix_tokens == 192 and beside.num_prefix_tokens == 0 and talker.num_cached_tokens == 192
    assert talker.blocks.num_cached_blocks == 10  # the second turn's new full blocks were registered
    again = conv.turn("t1-again", 192, 6)  # every prompt position cached: the prefill computes [voice, g0] only
    again_logits = run(talker, again)[0]
    assert again.num_prefix_tokens == 192
    for seq, logits in [(second, cached[0]), (beside, cached[1]), (again, again_logits)]:
        full = conv if seq is not beside else other
        whole = full.turn(seq.request_id, len(seq.prompt_ids), len(logits), session=None)
        alone = run(talker, whole)[0]
        assert whole.num_prefix_tokens == 0 and seq.codes == whole.codes
        torch.testing.assert_close(logits, alone, rtol=0, atol=LOGITS_TOLERANCE)
    assert again.codes == first.codes
    assert talker.num_free_tokens == 16384


def test_sessions_do_not_share_blocks_and_content_keys_must_match_the_prompt(talker: Talker):
    conv = Conversation("conv", 300, 2)
    run(talker, conv.turn("mine", 200, 4, session="mine"))
    theirs = conv.turn("theirs", 250, 4, session="theirs")
    run(talker, theirs)
    assert theirs.num_prefix_tokens == 0
    bad = conv.turn("bad", 200, 4)
    bad.content_keys = bad.content_keys[:-1]
    with pytest.raises(ValueError, match="199 content keys for a 200-token prompt"):
        talker.check(bad)


def test_a_referenced_block_is_never_evicted_and_an_evicted_prefix_is_recomputed(tiny_dir):
    talker = Talker.from_checkpoint(tiny_dir, max_seqs=4, memory_gib=pool_gib(40 * BLOCK_SIZE))
    mine, theirs = Conversation("mine", 500, 3), Conversation("theirs", 500, 4)
    first, other = mine.turn("a", 300, 4, session="s"), theirs.turn("e", 300, 4, session="t")
    run(talker, first)
    run(talker, other)  # 9 registered blocks each, nobody holds them
    assert talker.blocks.num_cached_blocks == 18 and talker.num_free_tokens == 40 * BLOCK_SIZE
    second = mine.turn("b", 400, 4, session="s")
    talker.add(second)  # holds the first turn's 9 blocks, reserves 4 more
    assert second.num_prefix_tokens == 288 and talker.num_free_tokens == 27 * BLOCK_SIZE
    filler = Conversation("filler", 900, 5).turn("f", 27 * BLOCK_SIZE - 5, 4, session=None)
    assert talker.can_add(filler)
    run(talker, filler)  # its 27 blocks: the 22 free ones, then 5 of the other session's cached ones
    assert not set(filler.block_table) & set(second.block_table)
    assert talker.blocks.num_cached_blocks == 9 + 4
    run(talker, second)
    assert second.codes == run_whole(talker, mine, second)
    again = theirs.turn("e-again", 300, 4, session="t")
    run(talker, again)  # its prefix was evicted from its end: the first 4 blocks are left
    assert again.num_prefix_tokens == 4 * BLOCK_SIZE and again.codes == other.codes
    huge = Conversation("huge", 1300, 6).turn("h", 40 * BLOCK_SIZE - 5, 4, session=None)
    run(talker, huge)  # the whole pool: every cached block is evicted
    assert talker.blocks.num_cached_blocks == 0
    recomputed = mine.turn("a-again", 300, 4, session="s")
    run(talker, recomputed)
    assert recomputed.num_prefix_tokens == 0 and recomputed.codes == first.codes
    assert talker.num_free_tokens == 40 * BLOCK_SIZE


def run_whole(talker: Talker, conv: Conversation, seq: TalkerSequence) -> list[int]:
    whole = conv.turn(f"{seq.request_id}-whole", len(seq.prompt_ids), seq.sampling.max_tokens, session=None)
    run(talker, whole)
    return whole.codes


def test_forgetting_a_session_drops_its_blocks_even_while_one_is_held(talker: Talker):
    conv, kept = Conversation("conv", 300, 7), Conversation("kept", 300, 8)
    run(talker, conv.turn("a", 200, 4, session="gone"))
    run(talker, kept.turn("k", 200, 4, session="kept"))
    live = conv.turn("b", 260, 4, session="gone")
    talker.add(live)
    assert live.num_prefix_tokens == 192 and talker.blocks.num_cached_blocks == 12
    talker.forget("gone")
    assert talker.blocks.num_cached_blocks == 6  # the kept session's
    run(talker, live)  # its prefix stays readable until it ends; its new blocks, chained to it, are not registered
    assert live.codes == run_whole(talker, conv, live)
    assert talker.blocks.num_cached_blocks == 6 and talker.num_free_tokens == 16384
    after = conv.turn("c", 260, 4, session="gone")
    run(talker, after)
    assert after.num_prefix_tokens == 0  # a new request of the session starts a fresh cache
    talker.forget("kept")
    talker.forget("gone")
    assert talker.blocks.num_cached_blocks == 0 and talker.num_free_tokens == 16384


def test_block_hashes_chain_over_the_session_the_keys_and_the_positions():
    conv = Conversation("conv", 100, 9)
    hashes = block_hashes("s", conv.keys[:100], conv.positions[:, :100], 32)
    assert len(hashes) == 3 and len(set(hashes)) == 3
    assert block_hashes("s", conv.keys[:64], conv.positions[:, :64], 32) == hashes[:2]  # a prefix's are a prefix
    assert block_hashes("other", conv.keys[:64], conv.positions[:, :64], 32)[0] != hashes[0]
    moved = conv.positions[:, :64].clone()
    moved[1, 40] += 1
    changed = block_hashes("s", conv.keys[:64], moved, 32)
    assert changed[0] == hashes[0] and changed[1] != hashes[1]
    assert block_hashes("s", conv.keys[:31], conv.positions[:, :31], 32) == []  # no full block


def test_block_manager_counts_shared_and_cached_blocks_exactly():
    blocks = BlockManager(num_blocks=6, block_size=4)
    a = TalkerSequence("a", [1] * 8, session="s", content_keys=(b"k",) * 8)
    a.block_hashes = [b"h0", b"h1"]
    blocks.reserve(a, 10)  # 3 blocks
    blocks.append(a, 10)
    blocks.register(a)
    assert blocks.num_cached_blocks == 2 and blocks.num_free_tokens == 12
    b = TalkerSequence("b", [1] * 12, session="s")
    b.block_hashes = [b"h0", b"h1", b"h2"]
    assert blocks.cached_prefix(b.block_hashes) == a.block_table[:2]
    assert blocks.can_reserve(20, b.block_hashes) and not blocks.can_reserve(20)  # 5 blocks: 2 of them shared
    blocks.reserve(b, 20)
    assert b.block_table == a.block_table[:2] and b.num_reserved_blocks == 3 and blocks.num_free_tokens == 0
    blocks.free(a)  # its shared blocks stay held by b
    assert blocks.num_free_tokens == 4
    blocks.append(b, 20)
    assert len(set(b.block_table)) == 5 and a.block_table == []
    with pytest.raises(RuntimeError, match="outgrew"):
        blocks.append(b, 21)
    blocks.free(b)
    blocks.free(b)
    assert blocks.num_free_tokens == 24 and blocks.num_cached_blocks == 2
    c = TalkerSequence("c", [1])
    blocks.reserve(c, 24)  # the whole pool: the cached blocks are evicted to make room
    blocks.append(c, 24)
    assert blocks.num_cached_blocks == 0 and sorted(c.block_table) == list(range(6))
