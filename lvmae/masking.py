"""Encoder masking and decoder masking (pure functions), each kind one entry of a table.

Conventions: tokens are numbered in patchify order over the grid (T', H', W'), N = T'*H'*W'.
`mask` is a bool (B, N) tensor, True where the token is HIDDEN from the encoder. `selected` is a bool
(B, N) tensor, True where the decoder reconstructs the token; it is always a subset of `mask`.
Every function takes an explicit `torch.Generator` (CPU) so a seed reproduces the masks; the randomness
is drawn on the CPU and moved to `device`, so CPU and GPU runs with one seed see the same masks.

The tables are the one list of each kind (lvmae.config validates `model.masking` against them; the
trainer and `lvmae plan` ask them what a kind needs):

    ENCODER_MASKINGS[kind]      # EncoderMasking: draw(batch, grid, ratio, generator, device), visible(...)
    DECODER_MASKINGS[strategy]  # DecoderMasking: score(...) ranks the masked tokens, needs_priority

A new decoder strategy is a score function and one line in DECODER_MASKINGS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None):
    return torch.rand(shape, generator=generator).to(device)


def tube_mask(
    batch: int, grid: tuple[int, int, int], ratio: float, generator=None, device=None
) -> torch.Tensor:
    """VideoMAE tube masking: one random spatial mask per sample, repeated over time.

    -> (B, N) bool with exactly T' * round(ratio * H'W') True per row.
    """
    t, h, w = grid
    n_masked = round(ratio * h * w)
    noise = _rand((batch, h * w), generator, device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    spatial = ranks < n_masked  # (B, H'W')
    return spatial[:, None, :].expand(batch, t, h * w).reshape(batch, t * h * w)


def random_mask(
    batch: int, grid: tuple[int, int, int], ratio: float, generator=None, device=None
) -> torch.Tensor:
    """Independent random masking over all N tokens -> (B, N) bool with round(ratio * N) True per row."""
    n = math.prod(grid)
    noise = _rand((batch, n), generator, device)
    return noise.argsort(dim=1).argsort(dim=1) < round(ratio * n)


def frame_mask(
    batch: int, grid: tuple[int, int, int], ratio: float, generator=None, device=None
) -> torch.Tensor:
    """Frame masking: whole token time steps hidden -> (B, N) bool, round(ratio * T') steps per row."""
    t, h, w = grid
    noise = _rand((batch, t), generator, device)
    steps = noise.argsort(dim=1).argsort(dim=1) < round(ratio * t)  # (B, T')
    return steps[:, :, None].expand(batch, t, h * w).reshape(batch, t * h * w)


@dataclass(frozen=True)
class EncoderMasking:
    """One encoder masking kind: draw(batch, grid, ratio, generator, device) -> (B, N) bool mask, and
    visible(grid, ratio) -> the exact number of tokens it leaves visible per sample."""

    draw: Callable[..., torch.Tensor]
    visible: Callable[[tuple[int, int, int], float], int]


def _tube_visible(grid: tuple[int, int, int], ratio: float) -> int:
    t, h, w = grid
    return t * (h * w - round(ratio * h * w))


def _frame_visible(grid: tuple[int, int, int], ratio: float) -> int:
    t, h, w = grid
    return (t - round(ratio * t)) * h * w


def _random_visible(grid: tuple[int, int, int], ratio: float) -> int:
    n = math.prod(grid)
    return n - round(ratio * n)


ENCODER_MASKINGS: dict[str, EncoderMasking] = {
    "tube": EncoderMasking(tube_mask, _tube_visible),  # VideoMAE
    "random": EncoderMasking(random_mask, _random_visible),
    "frame": EncoderMasking(frame_mask, _frame_visible),
}


def num_visible(grid: tuple[int, int, int], kind: str, ratio: float) -> int:
    """Tokens the encoder sees for a grid (T', H', W'), masking kind and ratio (exact, as masking uses)."""
    return ENCODER_MASKINGS[kind].visible(grid, ratio)


def running_cell_pattern(grid: tuple[int, int, int], cell: int, keep: int, phase: int = 0) -> torch.Tensor:
    """VideoMAE V2's running cell: which tokens a c x c cell pattern keeps, rolling one step per time step.

    Each spatial position has a cell slot k = (h mod c) * c + (w mod c); at time step tau the slots
    (k - tau - phase) mod c^2 < keep are kept. Over c^2 consecutive steps every slot is kept exactly
    `keep` times, so the decoder sees every position regularly without a random draw.
    -> (N,) bool in patchify order.
    """
    t, h, w = grid
    hh = torch.arange(h)[:, None] % cell
    ww = torch.arange(w)[None, :] % cell
    slot = (hh * cell + ww).reshape(1, h * w)  # (1, H'W')
    tau = torch.arange(t)[:, None]  # (T', 1)
    return (((slot - tau - phase) % (cell * cell)) < keep).reshape(-1)


# --- decoder masking: each strategy scores the masked tokens; the decoder rebuilds the top k ---------------


class ScoreContext(NamedTuple):
    """What a decoder strategy's score function may use besides the mask and k."""

    grid: tuple[int, int, int]  # (T', H', W')
    generator: torch.Generator | None  # the step's generator: draw all randomness from it
    priority: torch.Tensor | None  # (B, N) the tokenizer's priority, where the batch has one
    cell: int  # model.masking.running_cell_size
    n_masked: int  # encoder-masked tokens per sample


def random_scores(mask: torch.Tensor, k: int, ctx: ScoreContext) -> torch.Tensor:
    """A uniform random subset of the masked tokens."""
    return _rand(tuple(mask.shape), ctx.generator, mask.device)


def running_cell_scores(mask: torch.Tensor, k: int, ctx: ScoreContext) -> torch.Tensor:
    """VideoMAE V2: masked tokens on a running-cell pattern (random phase per sample) first, filled at
    random from the other masked tokens if the pattern holds too few; a random subset if too many."""
    b, n = mask.shape
    cell, gen = ctx.cell, ctx.generator
    keep = min(cell * cell, math.ceil(cell * cell * k / ctx.n_masked))
    phases = torch.randint(cell * cell, (b,), generator=gen).tolist()
    pattern = torch.stack([running_cell_pattern(ctx.grid, cell, keep, ph) for ph in phases]).to(mask.device)
    return pattern.float() * 2.0 + _rand((b, n), gen, mask.device)


def priority_scores(mask: torch.Tensor, k: int, ctx: ScoreContext) -> torch.Tensor:
    """LVMAE: the masked tokens of highest priority (the tokenizer's per-token score)."""
    priority = ctx.priority
    if priority is None:
        raise ValueError("decoder masking 'adaptive' needs per-token priority scores (from the tokenizer)")
    if priority.shape != mask.shape:
        raise ValueError(f"priority has shape {tuple(priority.shape)}, expected {tuple(mask.shape)}")
    return priority.float()


@dataclass(frozen=True)
class DecoderMasking:
    """One decoder masking strategy. score(mask, k, ctx) -> (B, N) float: the top k masked tokens by
    score are rebuilt (ctx: a ScoreContext); None: every masked token, no budget. needs_priority: it ranks
    by the tokenizer's priority, so a run needs a token set."""

    score: Callable[[torch.Tensor, int, ScoreContext], torch.Tensor] | None
    needs_priority: bool = False


DECODER_MASKINGS: dict[str, DecoderMasking] = {
    "all": DecoderMasking(None),  # VideoMAE: every masked token
    "random": DecoderMasking(random_scores),
    "running_cell": DecoderMasking(running_cell_scores),  # VideoMAE V2
    "adaptive": DecoderMasking(priority_scores, needs_priority=True),  # LVMAE
}


def decoder_masking(strategy: str) -> DecoderMasking:
    if strategy not in DECODER_MASKINGS:
        raise ValueError(
            f"unknown decoder masking {strategy!r}; expected one of {', '.join(DECODER_MASKINGS)}"
        )
    return DECODER_MASKINGS[strategy]


def decoder_count(n_tokens: int, n_masked: int, strategy: str, budget: float) -> int:
    """How many tokens the decoder reconstructs: every masked one for `all`, else the budget, capped."""
    if decoder_masking(strategy).score is None:
        return n_masked
    return max(1, min(n_masked, round(budget * n_tokens)))


def select_decoder_tokens(
    strategy: str,
    mask: torch.Tensor,
    grid: tuple[int, int, int],
    budget: float,
    generator: torch.Generator | None = None,
    priority: torch.Tensor | None = None,
    cell: int = 2,
) -> torch.Tensor:
    """Pick the tokens the decoder reconstructs, all among the encoder-masked ones.

    mask: (B, N) bool, the same count per row. priority: (B, N) float, for strategies that need it.
    -> selected (B, N) bool with exactly `decoder_count(...)` True per row, selected <= mask: the top
    `decoder_count` masked tokens by the strategy's score (DECODER_MASKINGS), or every masked one.
    """
    n_masked = int(mask[0].sum())  # CPU-GPU sync: one scalar per step
    kind = decoder_masking(strategy)
    k = decoder_count(mask.shape[1], n_masked, strategy, budget)
    if kind.score is None:
        return mask.clone()
    ctx = ScoreContext(grid, generator, priority, cell, n_masked)
    score = kind.score(mask, k, ctx).masked_fill(~mask, float("-inf"))
    top = score.topk(k, dim=1).indices
    selected = torch.zeros_like(mask)
    selected.scatter_(1, top, True)
    return selected


def indices_of(flags: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) bool with `count` True per row -> (B, count) indices of the True entries, ascending."""
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)
    return order[:, :count]


@dataclass
class MaskPlan:
    """Everything a training step needs to know about which tokens go where."""

    mask: torch.Tensor  # (B, N) bool, True = hidden from the encoder
    selected: torch.Tensor  # (B, N) bool, True = reconstructed by the decoder (subset of mask)
    ids_visible: torch.Tensor  # (B, N_vis) long, ascending
    ids_selected: torch.Tensor  # (B, N_sel) long, ascending

    @property
    def num_visible(self) -> int:
        return self.ids_visible.shape[1]

    @property
    def num_selected(self) -> int:
        return self.ids_selected.shape[1]

    def loss_weight(self) -> torch.Tensor:
        """(B, N_sel) float: 1 where the selected token is also encoder-masked (always, when built here)."""
        return (self.mask & self.selected).gather(1, self.ids_selected).float()


def plan_masks(
    cfg: Any,
    batch: int,
    grid: tuple[int, int, int],
    generator: torch.Generator | None = None,
    priority: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> MaskPlan:
    """Draw encoder and decoder masks for one batch (cfg: lvmae.config.MaskingConfig). priority: (B, N) or
    (B, T', H', W'), for strategies that need it (`adaptive`)."""
    mask = ENCODER_MASKINGS[cfg.encoder].draw(batch, grid, cfg.encoder_ratio, generator, device)
    if priority is not None:
        priority = priority.reshape(batch, -1).to(mask.device)
    selected = select_decoder_tokens(
        cfg.decoder, mask, grid, cfg.decoder_budget, generator, priority, cfg.running_cell_size
    )
    n = math.prod(grid)
    n_vis = num_visible(grid, cfg.encoder, cfg.encoder_ratio)
    n_sel = decoder_count(n, n - n_vis, cfg.decoder, cfg.decoder_budget)
    return MaskPlan(mask, selected, indices_of(~mask, n_vis), indices_of(selected, n_sel))
