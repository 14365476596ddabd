"""Encoder masking and decoder masking (pure functions).

Conventions: tokens are numbered in patchify order over the grid (T', H', W'), N = T'*H'*W'.
`mask` is a bool (B, N) tensor, True where the token is HIDDEN from the encoder. `selected` is a bool
(B, N) tensor, True where the decoder reconstructs the token; it is always a subset of `mask`.
Every function takes an explicit `torch.Generator` (CPU) so a seed reproduces the masks; the randomness
is drawn on the CPU and moved to `device`, so CPU and GPU runs with one seed see the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lvmae.config import MaskingConfig, num_visible


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


ENCODER_MASKS = {"tube": tube_mask, "random": random_mask, "frame": frame_mask}


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


def decoder_count(n_tokens: int, n_masked: int, strategy: str, budget: float) -> int:
    """How many tokens the decoder reconstructs: every masked one for `all`, else the budget, capped."""
    if strategy == "all":
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

    mask: (B, N) bool, the same count per row. priority: (B, N) float, needed by `adaptive`.
    -> selected (B, N) bool with exactly `decoder_count(...)` True per row, selected <= mask.
    - all: every masked token (VideoMAE).
    - random: a uniform random subset of the masked tokens.
    - running_cell: masked tokens on a running-cell pattern (random phase per sample) first, filled at
      random from the other masked tokens if the pattern holds too few; random subset if too many.
    - adaptive: per sample, the top-k masked tokens by `priority` (LVMAE).
    """
    b, n = mask.shape
    n_masked = int(mask[0].sum())  # CPU-GPU sync: one scalar per step
    k = decoder_count(n, n_masked, strategy, budget)
    if strategy == "all":
        return mask.clone()
    if strategy == "adaptive":
        if priority is None:
            raise ValueError(
                "decoder masking 'adaptive' needs per-token priority scores (from the tokenizer)"
            )
        if priority.shape != mask.shape:
            raise ValueError(f"priority has shape {tuple(priority.shape)}, expected {tuple(mask.shape)}")
        score = priority.float()
    elif strategy == "random":
        score = _rand((b, n), generator, mask.device)
    elif strategy == "running_cell":
        keep = min(cell * cell, math.ceil(cell * cell * k / n_masked))
        phases = torch.randint(cell * cell, (b,), generator=generator).tolist()
        pattern = torch.stack([running_cell_pattern(grid, cell, keep, ph) for ph in phases]).to(mask.device)
        score = pattern.float() * 2.0 + _rand((b, n), generator, mask.device)
    else:
        raise ValueError(f"unknown decoder masking {strategy!r}")
    score = score.masked_fill(~mask, float("-inf"))
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
    cfg: MaskingConfig,
    batch: int,
    grid: tuple[int, int, int],
    generator: torch.Generator | None = None,
    priority: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> MaskPlan:
    """Draw encoder and decoder masks for one batch. priority: (B, N) or (B, T', H', W'), for `adaptive`."""
    mask = ENCODER_MASKS[cfg.encoder](batch, grid, cfg.encoder_ratio, generator, device)
    if priority is not None:
        priority = priority.reshape(batch, -1).to(mask.device)
    selected = select_decoder_tokens(
        cfg.decoder, mask, grid, cfg.decoder_budget, generator, priority, cfg.running_cell_size
    )
    n = math.prod(grid)
    n_vis = num_visible(grid, cfg.encoder, cfg.encoder_ratio)
    n_sel = decoder_count(n, n - n_vis, cfg.decoder, cfg.decoder_budget)
    return MaskPlan(mask, selected, indices_of(~mask, n_vis), indices_of(selected, n_sel))
