"""Fixed 3D sine-cosine position embeddings (pure functions)."""

from __future__ import annotations

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
