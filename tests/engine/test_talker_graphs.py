"""The decode step's CUDA-graph path: buckets, padding, static buffers (on CPU, without the capture), and
graphs against eager where a GPU exists."""

from __future__ import annotations

import pytest
import torch
from talker_inputs import pool_gib, synthetic

from omnitalk.engine.talker import Talker
from omnitalk.engine.talker.block_manager import num_blocks_for
from omnitalk.engine.talker.graphs import DecodeGraphs, DecodeInputs, batch_bucket, block_bucket


def test_buckets():
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 5, 17, 33, 49, 64)] == [1, 2, 4, 8, 24, 48, 64, 64]
    assert [batch_bucket(n, 6) for n in (3, 5, 6)] == [4, 6, 6]
    assert [block_bucket(n, 100) for n in (1, 2, 3, 33, 64, 65, 100)] == [1, 2, 4, 64, 64, 100, 100]
    for bad in (lambda: batch_bucket(0, 8), lambda: batch_bucket(9, 8), lambda: block_bucket(101, 100)):
        with pytest.raises(ValueError, match="outside"):
            bad()


def graphs_on_cpu(talker: Talker) -> DecodeGraphs:
    runner, blocks = talker.runner, talker.blocks
    return DecodeGraphs(
        runner.decode_forward,
        talker.max_seqs,
        num_blocks_for(talker.max_seq_len, blocks.block_size),
        blocks.num_blocks,
        blocks.block_size,
        talker.config.embedding_size,
        runner.pool.dtype,
        runner.device,
    )


def inputs(batch: int, blocks: int, fill: int) -> DecodeInputs:
    return DecodeInputs(
        embeds=torch.full((batch, 1, 64), float(fill)),
        positions=torch.full((batch,), fill),
        write=torch.full((batch,), fill),
        block_tables=torch.full((batch, blocks), fill),
        context_lens=torch.full((batch,), fill),
    )


def test_loading_pads_to_the_bucket_and_resets_stale_rows(tiny_dir):
    talker = Talker.from_checkpoint(tiny_dir, max_seqs=8, memory_gib=pool_gib(4096), max_seq_len=1024)
    graphs, scratch = graphs_on_cpu(talker), talker.blocks.num_blocks
    assert graphs.load(inputs(4, 7, fill=5)) == (4, 8)
    assert graphs.load(inputs(3, 5, fill=9)) == (4, 8)  # row 3 and columns 5.. held the first batch's values
    static = graphs.static_inputs((4, 8))
    assert static.embeds[:3].eq(9).all() and static.embeds[3].eq(0).all()
    assert static.positions.tolist() == [9, 9, 9, 0]
    assert static.write.tolist() == [9, 9, 9, scratch * talker.blocks.block_size]
    assert static.context_lens.tolist() == [9, 9, 9, 1]
    assert static.block_tables[:3, :5].eq(9).all()
    assert static.block_tables[:3, 5:].eq(scratch).all() and static.block_tables[3].eq(scratch).all()
    assert graphs.captured == []  # nothing is captured off CUDA


def test_the_padded_static_path_gives_the_eager_codes(tiny_dir):
    """Streams joining and leaving (batch buckets 1..4) and growing past block buckets, through the static
    buffers, decode exactly as the eager step does."""
    # (joins at step, name, prompt, codes): batches of 2, 3 (padded), 4, then 3 again, padded over a stale row
    plan = [(0, "a", 40, 14), (0, "b", 90, 30), (5, "c", 20, 30), (9, "d", 300, 30)]

    def run(static: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
        talker = Talker.from_checkpoint(tiny_dir, max_seqs=4, memory_gib=pool_gib(4096), max_seq_len=1024)
        assert talker.runner.graphs is None  # CPU: eager
        if static:
            talker.runner.graphs = graphs_on_cpu(talker)
        seqs = [synthetic(name, n, codes, i, temperature=0.9, seed=i) for i, (_, name, n, codes) in enumerate(plan)]
        step, logits = 0, []
        while not all(seq.finished for seq in seqs):
            for (join, *_), seq in zip(plan, seqs, strict=True):
                if join == step:
                    talker.add(seq)
            talker.step([seq for seq in seqs if seq.slot is not None])
            logits.append(talker.last_logits)
            step += 1
        return [seq.codes for seq in seqs], logits

    (static_codes, static_logits), (eager_codes, eager_logits) = run(static=True), run(static=False)
    assert static_codes == eager_codes
    for padded, eager in zip(static_logits, eager_logits, strict=True):
        torch.testing.assert_close(padded, eager, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_give_the_eager_codes(tiny_dir):
    def run(eager: bool) -> tuple[list[list[int]], list[tuple[int, int]]]:
        talker = Talker.from_checkpoint(tiny_dir, device="cuda", max_seqs=8, memory_gib=0.01, enforce_eager=eager)
        seqs = [synthetic(f"s{i}", 30 + 70 * i, 40, i, temperature=0.9, seed=i) for i in range(5)]
        for seq in seqs:
            talker.add(seq)
        while not all(seq.finished for seq in seqs):
            talker.step([seq for seq in seqs if not seq.finished])
        return [seq.codes for seq in seqs], [] if eager else talker.runner.graphs.captured

    graphed, captured = run(eager=False)
    eager, _ = run(eager=True)
    assert captured and graphed == eager
