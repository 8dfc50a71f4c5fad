"""Per-request codec sampling, batched: repetition penalty, codec-bos suppression, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TalkerSampling:
    """Defaults are transformers' generate() talker settings; temperature 0 is greedy (penalty still applies)."""

    temperature: float = 0.9
    top_k: int = 40  # 0: no top-k
    top_p: float = 0.8
    repetition_penalty: float = 1.05
    seed: int | None = None  # None: a fresh random seed
    max_tokens: int = 4096
    stop_codes: tuple[int, ...] = (8292, 8294)  # codec pad and eos, as generate(); vllm-omni stops on eos only

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling settings {self}")
        if self.repetition_penalty <= 0 or self.max_tokens < 1:
            raise ValueError(f"bad sampling settings {self}")


def sample(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params: list[TalkerSampling],
    generators: list[torch.Generator | None],
    suppress: list[int],
) -> list[int]:
    """One code per row of `logits` [B, V] (fp32); `seen` [B, V] marks the codes each row's penalty covers.

    Each sampled row draws from its own generator with transformers' ops (softmax, multinomial on a [1, V]
    row), so a seed reproduces generate()'s draws and a row's draw never depends on its batch.
    """
    penalty = logits.new_tensor([p.repetition_penalty for p in params])[:, None]
    scores = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    scores[:, suppress] = -torch.inf
    codes = scores.argmax(-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        probs = _warp(scores[rows], [params[i] for i in rows]).softmax(-1)
        for k, i in enumerate(rows):
            codes[i] = torch.multinomial(probs[k : k + 1], 1, generator=generators[i])[0, 0]
    return codes.tolist()


def _warp(scores: torch.Tensor, params: list[TalkerSampling]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, each per row, with transformers' warpers' exact comparisons."""
    scores = scores / scores.new_tensor([p.temperature for p in params])[:, None]
    vocab = scores.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=scores.device)
    kth = torch.topk(scores, int(top_k.max())).values.gather(1, top_k[:, None] - 1)
    scores = scores.masked_fill(scores < kth, -torch.inf)
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    threshold = scores.new_tensor([1 - p.top_p for p in params])[:, None]  # 1 - p in float64, as transformers
    drop = (cumulative <= threshold) & scores.new_tensor([p.top_p < 1 for p in params], dtype=torch.bool)[:, None]
    drop[:, -1] = False  # keep at least one
    return scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)
