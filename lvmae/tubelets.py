"""Tubelets: cutting a clip into t x p x p tokens and putting it back together (pure functions)."""

from __future__ import annotations

import torch


def patchify(video: torch.Tensor, t: int, p: int) -> torch.Tensor:
    """Cut a clip into flattened tubelets.

    video: (B, C, T, H, W) -> (B, N, t*p*p*C) with N = (T/t)*(H/p)*(W/p), tokens in (T', H', W') order
    and each tubelet's values in (t, p, p, C) order.
    """
    b, c, T, H, W = video.shape
    x = video.reshape(b, c, T // t, t, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', H', W', t, p, p, C)
    return x.reshape(b, (T // t) * (H // p) * (W // p), t * p * p * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], t: int, p: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, t*p*p*C) -> (B, C, T, H, W) for a token grid (T', H', W')."""
    b, _, d = tokens.shape
    gt, gh, gw = grid
    c = d // (t * p * p)
    x = tokens.reshape(b, gt, gh, gw, t, p, p, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', t, H', p, W', p)
    return x.reshape(b, c, gt * t, gh * p, gw * p)


def normalize_tubelets(tubelets: torch.Tensor, t: int, p: int, eps: float = 1e-6) -> torch.Tensor:
    """VideoMAE's per-tubelet target normalization: per channel, zero mean and unit std over t*p*p pixels.

    tubelets: (B, N, t*p*p*C) -> same shape. Because it is invariant to a per-channel affine map, it
    gives the same target whether the input was normalized with dataset mean/std or not.
    """
    b, n, d = tubelets.shape
    x = tubelets.reshape(b, n, t * p * p, d // (t * p * p)).float()
    mean = x.mean(dim=-2, keepdim=True)
    std = x.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return ((x - mean) / (std + eps)).reshape(b, n, d)


def pixel_targets(video: torch.Tensor, t: int, p: int, norm: bool = True) -> torch.Tensor:
    """Pixel reconstruction targets for every token: (B, C, T, H, W) -> (B, N, t*p*p*C)."""
    x = patchify(video, t, p)
    return normalize_tubelets(x, t, p) if norm else x.float()


def gather_tubelets(video: torch.Tensor, ids: torch.Tensor, t: int, p: int) -> torch.Tensor:
    """The tubelets `ids` of a clip, without patchifying the rest: equal to patchify(video)[b, ids[b]].

    video: (B, C, T, H, W), ids: (B, K) token numbers in patchify order -> (B, K, t*p*p*C).
    Only the K selected tubelets are copied, so the cost follows K, not the clip length.
    """
    b, c, T, H, W = video.shape
    gh, gw = H // p, W // p
    x = video.view(b, c, T // t, t, gh, p, gw, p).permute(
        0, 2, 4, 6, 3, 5, 7, 1
    )  # (B, T', H', W', t, p, p, C)
    rows = torch.arange(b, device=ids.device)[:, None]
    picked = x[rows, ids // (gh * gw), (ids // gw) % gh, ids % gw]  # (B, K, t, p, p, C)
    return picked.reshape(b, ids.shape[1], t * p * p * c)
