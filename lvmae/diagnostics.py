"""How good a tokenizer is, in numbers: reconstruction, codebook use, and what its priority picks.

Pure functions on tensors (shapes in the docstrings); `lvmae eval tokenizer` and the benchmarks call them.
Clips are float in [0, 1], (B, C, T, H, W); token grids are (B, T', H', W').
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lvmae.topk import topk_count

# A sigmoid of a logit past this size is within 1e-3 of 0 or 1: where a bounded score stops ranking.
SATURATION_LOGIT = math.log(999.0)


def psnr(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) pair in [0, 1] -> (B,) peak signal-to-noise ratio in dB (recon clamped to [0, 1])."""
    mse = (recon.float().clamp(0, 1) - video.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def ssim(recon: torch.Tensor, video: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """(B, C, T, H, W) pair in [0, 1] -> (B,) mean SSIM (Wang et al. 2004) over frames and channels, with
    a Gaussian window on each frame (no padding: windows lie inside the frame)."""
    x = recon.float().clamp(0, 1)
    y = video.float()
    b, c, t, h, w = x.shape
    window = min(window, h, w)
    g = torch.exp(-((torch.arange(window, dtype=torch.float32) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(1, 1, window, window)

    def blur(z: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B*C*T, 1, h', w')
        return F.conv2d(z.reshape(b * c * t, 1, h, w), kernel)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(b, -1).mean(1)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Any-shape int codes -> {"used_share": codes used / codebook size, "perplexity": exp(entropy) of the
    code histogram, "perplexity_share": perplexity / codebook size}."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    perplexity = float(torch.exp(-(nz * nz.log()).sum()))
    return {
        "used_share": float((counts > 0).double().mean()),
        "perplexity": perplexity,
        "perplexity_share": perplexity / codebook_size,
    }


def frame_difference(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T', H', W'): each token's mean absolute difference between its frames and
    the frame before each (the first frame of the clip has none: it counts as unchanged)."""
    v = video.float()
    diff = torch.zeros_like(v)
    diff[:, :, 1:] = (v[:, :, 1:] - v[:, :, :-1]).abs()
    return F.avg_pool3d(diff.mean(1, keepdim=True), (tubelet, patch, patch)).squeeze(1)


def top_mask(priority: torch.Tensor, top: float) -> torch.Tensor:
    """(B, ...) priority -> (B, ...) bool: each clip's top `top` share of tokens (ties: torch.topk's)."""
    flat = priority.reshape(priority.shape[0], -1)
    k = topk_count(flat.shape[1], top)
    idx = flat.float().topk(k, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).view_as(priority)


def lift(priority: torch.Tensor, region: torch.Tensor, top: float = 0.15) -> float:
    """How much more often a clip's top `top` tokens by priority fall in `region` than chance would put
    them there: (share of top tokens in the region) / (the region's share of all tokens), pooled over the
    batch. 1.0 is chance; the ceiling is 1 / max(region share, top)."""
    picked = top_mask(priority, top)
    region = region.bool().reshape(picked.shape)
    hit_share = (picked & region).sum().item() / max(1, picked.sum().item())
    region_share = region.float().mean().item()
    return hit_share / region_share if region_share > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) float ranks (ties in index order: enough for continuous scores)."""
    return x.argsort(1).argsort(1).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """(B, ...) pair -> mean over clips of the rank correlation of a clip's values."""
    ra, rb = _ranks(a.reshape(a.shape[0], -1).float()), _ranks(b.reshape(b.shape[0], -1).float())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    corr = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return float(corr.mean())


def priority_diagnostics(priority: torch.Tensor, frame_diff: torch.Tensor, top: float = 0.15) -> dict:
    """priority (B, T', H', W') logits and frame_diff (B, T', H', W') -> what the priority does:

    - saturation_share: tokens whose sigmoid(logit) is within 1e-3 of 0 or 1 (a bounded score stored
      at low precision ties there);
    - entropy: entropy of softmax(logits) over a clip's tokens / log(N), mean over clips (1: flat);
    - top_share_per_time: share of the top `top` tokens at each time step (uniform: 1 / T' each);
    - frame_diff_spearman: rank correlation with the frame difference, mean over clips;
    - logit_mean, logit_std.
    """
    b, t = priority.shape[:2]
    p = priority.float().reshape(b, -1)
    ent = -(F.softmax(p, 1) * F.log_softmax(p, 1)).sum(1) / math.log(p.shape[1])
    per_time = top_mask(priority, top).reshape(b, t, -1).sum((0, 2)).double()
    return {
        "saturation_share": float((p.abs() > SATURATION_LOGIT).float().mean()),
        "entropy": float(ent.mean()),
        "top_share_per_time": [round(float(x), 4) for x in per_time / per_time.sum()],
        "frame_diff_spearman": spearman(priority, frame_diff),
        "logit_mean": float(p.mean()),
        "logit_std": float(p.std()),
    }
