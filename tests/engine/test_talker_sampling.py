"""Batched codec sampling: transformers' logits processors, exact draws, and seeds that are per request."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omnitalk.engine.talker.sampling import TalkerSampling, gumbel, penalised, sample, seed_words, warp

VOCAB = 8448
BOS = 8293


def processed_by_transformers(logits: torch.Tensor, history: torch.Tensor, p: TalkerSampling) -> torch.Tensor:
    """One row through generate()'s processors, in generate()'s order."""
    scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(history[None], logits[None].clone())
    scores[:, BOS] = -torch.inf
    scores = TemperatureLogitsWarper(p.temperature)(history[None], scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(history[None], scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(history[None], scores)
    return scores[0]


def test_warped_scores_equal_transformers_processors():
    params = [
        TalkerSampling(),
        TalkerSampling(temperature=0.5, top_k=5, top_p=0.95, repetition_penalty=1.3),
        TalkerSampling(temperature=1.7, top_k=0, top_p=0.5, repetition_penalty=1.0),
        TalkerSampling(temperature=1.0, top_k=300, top_p=1.0, repetition_penalty=0.8),
    ]
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(len(params), VOCAB, generator=generator)
    history = torch.randint(0, VOCAB, (len(params), 50), generator=generator)
    seen = torch.zeros(len(params), VOCAB, dtype=torch.bool).scatter_(1, history, True)
    warped, codes = warp(penalised(logits, seen, params, [BOS]), params)
    ours = torch.full_like(logits, -torch.inf).scatter(1, codes, warped)  # the candidates back in the vocabulary
    for row, p in enumerate(params):
        expected = processed_by_transformers(logits[row], history[row], p)
        assert torch.equal(ours[row].isinf(), expected.isinf())
        torch.testing.assert_close(ours[row], expected, rtol=1e-6, atol=0)


def test_draws_follow_the_softmax_of_the_warped_scores():
    """Many draws of one request (one per step) against the distribution: a chi-square test at p = 0.001."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = TalkerSampling(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    draws = 30_000
    seeds = torch.tensor([seed_words(11)]).expand(draws, -1)
    codes = sample(logits.expand(draws, -1), torch.zeros(draws, 6, dtype=torch.bool), [p] * draws, seeds,
                   torch.arange(draws), [])  # fmt: skip
    counts = torch.bincount(codes, minlength=6).double()
    expected = logits[0].softmax(-1).double() * draws
    assert ((counts - expected) ** 2 / expected).sum() < 20.5  # chi-square, 5 degrees of freedom
    top_two = TalkerSampling(temperature=1.0, top_k=2, top_p=1.0)
    codes = sample(logits.expand(draws, -1), torch.zeros(draws, 6, dtype=torch.bool), [top_two] * draws, seeds,
                   torch.arange(draws), [])  # fmt: skip
    assert set(codes.tolist()) == {0, 1}


def test_seeds_are_per_request_within_one_batch():
    """Rows with the same seed and step draw the same code whatever their batch; other seeds differ."""
    generator = torch.Generator().manual_seed(1)
    steps = 40
    logits = torch.randn(steps, VOCAB, generator=generator)  # one row of logits per step
    params = [TalkerSampling(seed=s) for s in (7, 7, 8)] + [TalkerSampling(temperature=0, seed=7)]
    seeds = torch.tensor([seed_words(p.seed) for p in params])
    unseen = torch.zeros(len(params), VOCAB, dtype=torch.bool)
    batched, alone = [], []
    for step in range(steps):
        row = logits[step : step + 1].expand(len(params), -1)
        batched.append(sample(row, unseen, params, seeds, torch.full((len(params),), step), [BOS]).tolist())
        alone.append(sample(row[:1], unseen[:1], params[:1], seeds[:1], torch.tensor([step]), [BOS]).item())
    columns = list(zip(*batched, strict=True))
    assert list(columns[0]) == list(columns[1]) == alone
    assert columns[2] != columns[0]
    assert list(columns[3]) == logits.masked_fill(torch.arange(VOCAB) == BOS, -torch.inf).argmax(-1).tolist()
    assert len(set(columns[0])) > steps // 2  # sampled, not stuck


def test_gumbel_noise_is_a_function_of_seed_step_and_code():
    seeds = torch.tensor([seed_words(3), seed_words(3), seed_words(2**40 + 3)])
    codes = torch.arange(1000).expand(3, -1)
    noise = gumbel(seeds, torch.tensor([5, 6, 5]), codes)
    assert torch.equal(noise[0], gumbel(seeds[:1], torch.tensor([5]), codes[:1])[0])
    assert torch.equal(noise[0, 10:20], gumbel(seeds[:1], torch.tensor([5]), codes[:1, 10:20])[0])  # any subset
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])  # the high word counts
    assert noise.isfinite().all() and abs(noise.mean().item() - 0.5772) < 0.05  # the Euler-Mascheroni constant


def test_a_fresh_seed_when_none_is_given():
    assert seed_words(None) != seed_words(None)
    assert seed_words(-1) == (2**32 - 1, 2**32 - 1)
    with pytest.raises(ValueError, match="bad sampling"):
        TalkerSampling(top_p=0)


def test_top_k_keeps_scores_tied_with_the_kth_as_transformers():
    logits = torch.tensor([[5.0, 3.0, 4.0, 3.0, 1.0, 3.0, 0.0, 3.0]])
    p = TalkerSampling(temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0)
    warped, codes = warp(penalised(logits, torch.zeros_like(logits, dtype=torch.bool), [p], []), [p])
    ours = torch.full_like(logits, -torch.inf).scatter(1, codes, warped)
    expected = TopKLogitsWarper(3)(None, logits.clone())
    assert torch.equal(ours, expected) and ours.isfinite().sum() == 6  # 5, 4 and the four 3s
