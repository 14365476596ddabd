"""Where the adaptive decoder mask's per-token priority comes from (model.masking.priority).

LVMAE ranks tokens by the tokenizer's learned score. Two alternatives are named options, because the
learned score does not find change on every kind of clip (docs/tokenizer.md, "Does it find change on
clips nobody tuned to?"):

    PRIORITY_SOURCES["learned"]     the tokenizer's score, from the token set (data.tokens)
    PRIORITY_SOURCES["frame_diff"]  each token's mean absolute difference from the frame before: no
                                    learning, no token set needed for it
    PRIORITY_SOURCES["combined"]    the mean of the two ranks within each clip

    priority = token_priority("combined", learned, video, tubelet=2, patch=16)   # (B, T', H', W')

Only the order of a clip's scores matters to the mask (lvmae.masking takes the top of them), so ranks
combine scores on different scales without any weight to tune.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lvmae.diagnostics import frame_difference


def clip_ranks(score: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, ...) float in [0, 1]: each score's rank within its clip, 0 the lowest and 1 the
    highest (ties broken by position: argsort is stable)."""
    flat = score.reshape(score.shape[0], -1).float()
    order = flat.argsort(dim=1, stable=True)
    ranks = torch.empty_like(flat)
    steps = torch.arange(flat.shape[1], dtype=flat.dtype, device=flat.device).expand_as(flat)
    ranks.scatter_(1, order, steps)
    return (ranks / max(1, flat.shape[1] - 1)).reshape(score.shape)


def _learned(learned: torch.Tensor | None, video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    if learned is None:
        raise ValueError("model.masking.priority=learned needs the tokenizer's scores (data.tokens)")
    return learned.float()


def _frame_diff(learned: torch.Tensor | None, video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    return frame_difference(video, tubelet, patch)


def _combined(learned: torch.Tensor | None, video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    fd = _frame_diff(None, video, tubelet, patch)
    score = _learned(learned, video, tubelet, patch).to(fd.device).reshape(fd.shape)
    return 0.5 * (clip_ranks(score) + clip_ranks(fd))


@dataclass(frozen=True)
class PrioritySource:
    """score(learned, video, tubelet, patch) -> (B, T', H', W'); needs_tokens: it reads the token set."""

    score: Callable[[torch.Tensor | None, torch.Tensor, int, int], torch.Tensor]
    needs_tokens: bool


PRIORITY_SOURCES: dict[str, PrioritySource] = {
    "learned": PrioritySource(_learned, needs_tokens=True),
    "frame_diff": PrioritySource(_frame_diff, needs_tokens=False),
    "combined": PrioritySource(_combined, needs_tokens=True),
}


def token_priority(
    source: str, learned: torch.Tensor | None, video: torch.Tensor, tubelet: int, patch: int
) -> torch.Tensor:
    """The priority of every token of a batch: source a PRIORITY_SOURCES name; learned (B, T', H', W') or
    (B, N), the tokenizer's scores where the source needs them; video (B, C, T, H, W)."""
    return PRIORITY_SOURCES[source].score(learned, video, tubelet, patch)
