"""Per-request codec sampling, batched: repetition penalty, codec-bos suppression, temperature, top-k, top-p.

Random draws are counter-based: a code's noise is a hash of (request seed, step, code), so a request's
draws never depend on its batch, and a whole batch samples in a few tensor ops with no generator state.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


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


def seed_words(seed: int | None) -> tuple[int, int]:
    """A request's seed as two 32-bit words (the hash works in 32 bits); None draws a fresh one."""
    value = secrets.randbits(64) if seed is None else seed & (2**64 - 1)
    return value & _MASK32, value >> 32


def sample(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params: list[TalkerSampling],
    seeds: torch.Tensor,
    steps: torch.Tensor,
    suppress: list[int],
) -> torch.Tensor:
    """Codes [B] (long, on the logits' device) for `logits` [B, V] (fp32).

    `seen` [B, V] marks the codes each row's penalty covers; `seeds` [B, 2] are `seed_words`; `steps` [B]
    count each request's draws so far. Greedy rows take the argmax; sampled rows the Gumbel-max of their
    warped scores, which is an exact draw from their softmax. Only the codes top-k keeps are warped and
    drawn from (a few dozen, not the vocabulary), and their noise is the same as over the whole vocabulary.
    """
    scores = penalised(logits, seen, params, suppress)
    greedy = [p.temperature == 0 for p in params]
    if all(greedy):
        return scores.argmax(-1)
    warped, codes = warp(scores, params)
    drawn = codes.gather(1, (warped + gumbel(seeds, steps, codes)).argmax(-1, keepdim=True))[:, 0]
    if not any(greedy):
        return drawn
    return torch.where(torch.tensor(greedy, device=scores.device), scores.argmax(-1), drawn)


def penalised(logits: torch.Tensor, seen: torch.Tensor, params: list[TalkerSampling], suppress: list[int]):
    """Repetition penalty over the seen codes (transformers' rule: negative scores times, positive divided),
    then the suppressed codes at -inf.

    With a penalty p > 1 the rule's pick is always the smaller of x * p and x / p (the larger with p < 1; the
    same value with p = 1), so it is taken with min / max, exactly, instead of a select on each score's sign
    (which costs several times as much on a CPU: the signs are random)."""
    values = [p.repetition_penalty for p in params]
    penalty = logits.new_tensor(values)[:, None]
    times, divided = logits * penalty, logits / penalty
    if all(v >= 1 for v in values):
        penalised = torch.minimum(times, divided)
    else:
        penalised = torch.where(penalty < 1, torch.maximum(times, divided), torch.minimum(times, divided))
    scores = torch.where(seen, penalised, logits)
    scores[:, suppress] = -torch.inf
    return scores


def warp(scores: torch.Tensor, params: list[TalkerSampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then top-k, then top-p, each per row, with transformers' warpers' exact comparisons, on
    the candidates top-k can keep: (warped scores [B, K], their codes [B, K]), -inf where a warper drops one.

    K is the largest row's top-k, widened to keep scores tied with a row's k-th (transformers keeps ties);
    a row without top-k makes it the vocabulary. Greedy rows are warped at temperature 1; `sample` ignores them.
    """
    scores = scores / scores.new_tensor([p.temperature or 1.0 for p in params])[:, None]
    vocab = scores.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=scores.device)[:, None]
    widest = int(top_k.max())
    values, codes = torch.topk(scores, min(widest + 1, vocab))  # descending; one more, to see ties past it
    kth = values.gather(1, top_k - 1)
    if values.shape[1] > widest and bool((values[:, -1:] >= kth).any()):
        values, codes = torch.topk(scores, int((scores >= kth).sum(-1).max()))
    elif values.shape[1] > widest:
        values, codes = values[:, :widest], codes[:, :widest]
    values = values.masked_fill(values < kth, -torch.inf).flip(-1)  # ascending, as transformers' top-p sorts
    codes = codes.flip(-1)
    cumulative = values.softmax(-1).cumsum(-1)
    threshold = scores.new_tensor([1 - p.top_p for p in params])[:, None]  # 1 - p in float64, as transformers
    drop = (cumulative <= threshold) & torch.tensor([p.top_p < 1 for p in params], device=scores.device)[:, None]
    drop[:, -1] = False  # keep at least one
    return values.masked_fill(drop, -torch.inf), codes


def gumbel(seeds: torch.Tensor, steps: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [B, N] (fp32) for the codes [B, N] (long), a pure function of (seed, step, code)."""
    key = _mix(seeds[:, 0] ^ _mix(seeds[:, 1] ^ _mix(steps)))
    bits = _mix(key[:, None] ^ _mix(codes))
    uniform = ((bits >> 8).float() + 0.5) / 2**24  # 24 bits, strictly inside (0, 1)
    return -torch.log(-torch.log(uniform))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 values below 2**32: no product can overflow."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)
