"""TMRoPE positions of the talker prompt, from the thinker's prompt positions (`ThinkerStart.positions`)."""

from __future__ import annotations

import torch


def talker_positions(thinker_positions: torch.Tensor | None, prompt_len: int) -> tuple[torch.Tensor, int]:
    """Positions [3, L+2] of prompt + [speaker bos, g0] and the delta that continues them (position = cache
    index + delta), from the thinker's prompt positions [3, L] (None: 1-D, as for text and audio prompts).

    A chat prompt ends in text, so the two extra tokens continue its last position on all three axes.
    """
    if thinker_positions is None:
        return torch.arange(prompt_len + 2).expand(3, -1), 0
    if tuple(thinker_positions.shape) != (3, prompt_len):
        raise ValueError(f"prompt positions {tuple(thinker_positions.shape)} do not match a {prompt_len}-token prompt")
    prompt = thinker_positions.long().cpu()
    last = prompt[:, -1:] if prompt_len else torch.full((3, 1), -1)
    positions = torch.cat([prompt, last + 1, last + 2], dim=1)
    return positions, int(positions.max()) + 1 - (prompt_len + 2)
