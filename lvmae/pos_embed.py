"""Fixed sine-cosine position embeddings (pure functions).

Two tables, chosen by `model.pos_embed` (lvmae.config.POS_EMBEDS):

    sincos_3d(dim, grid)          # separate sine-cosine codes of t, h and w, side by side in the channels
    videomae_1d(dim, num_tokens)  # VideoMAE's: one sine-cosine code of the flattened token index
    position_table(kind, dim, grid)  # either, for a token grid: what the encoder and decoder hold
"""

from __future__ import annotations

import math

import numpy as np
import torch


def sincos_1d(dim: int, positions: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """positions (N,) -> (N, dim): sin on the first half of the channels, cos on the second."""
    if dim % 2:
        raise ValueError(f"sine-cosine embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / temperature**omega
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """(T', H', W') grid -> (T'*H'*W', dim) embeddings, in patchify's token order.

    The channels are split between time, height and width: each axis gets an even share, time taking
    what is left over so any dim divisible by 2 works (VideoMAE-sized dims split evenly).
    """
    if dim % 2:
        raise ValueError(f"position embedding dim must be even, got {dim}")
    d_hw = (dim // 3) // 2 * 2
    d_t = dim - 2 * d_hw
    gt, gh, gw = grid
    tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.cat(
        [
            sincos_1d(d_t, tt.reshape(-1)),
            sincos_1d(d_hw, hh.reshape(-1)),
            sincos_1d(d_hw, ww.reshape(-1)),
        ],
        dim=1,
    )


def videomae_1d(dim: int, num_tokens: int) -> torch.Tensor:
    """(num_tokens, dim): VideoMAE's table over the flattened token index n (patchify's order): channel j
    holds sin (j even) or cos (j odd) of n / 10000 ** (2 * (j // 2) / dim).

    Computed in float64 with numpy, as VideoMAE and Hugging Face transformers compute it, then rounded to
    float32: the table equals transformers' `get_sinusoid_encoding_table` bit for bit, so weights trained
    with it run unchanged in transformers' VideoMAEModel.
    """
    if dim < 1 or num_tokens < 1:
        raise ValueError(f"position table needs dim >= 1 and num_tokens >= 1, got {dim}, {num_tokens}")
    # The per-channel divisor the way the reference computes it (a scalar numpy power per channel).
    divisor = np.array([np.power(10000, 2 * (j // 2) / dim) for j in range(dim)], dtype=np.float64)
    table = np.arange(num_tokens, dtype=np.float64)[:, None] / divisor[None, :]
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.from_numpy(table).float()


def position_table(kind: str, dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """(T'*H'*W', dim) fixed positions of `kind` (`sincos_3d` or `videomae_1d`) for a token grid.

    Both are functions of the grid alone, so a model built for another grid (more frames, a larger
    clip) gets its own table with the same weights.
    """
    if kind == "sincos_3d":
        return sincos_3d(dim, grid)
    if kind == "videomae_1d":
        return videomae_1d(dim, math.prod(grid))
    raise ValueError(f"unknown position embedding {kind!r}; expected sincos_3d or videomae_1d")
