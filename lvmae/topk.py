"""Differentiable top-k masks for the tokenizer's token selection (pure functions, shapes in docstrings).

The tokenizer keeps the k highest-scoring tokens and drops the rest; to train the scorer, the choice
must pass a gradient. Two ways, both returning a (B, N) mask whose rows sum to exactly k:

- `perturbed_topk_mask` (the default, as the LVMAE paper does): the perturbed maximum of Berthet et al.
  (2020), used for patch selection by Cordonnier et al. (2021). The forward value is the expectation of
  the hard top-k indicator of the scores plus Gaussian noise (sigma), estimated over `num_samples` draws;
  the backward pass is the matching Monte-Carlo estimate of that expectation's Jacobian,
  dE[y_i] / ds_j = E[y_i Z_j] / sigma. Every token gets a gradient in proportion to how often noise of
  its size moves it across the boundary, so tokens well below the threshold still learn.
- `sigmoid_topk_mask`: the exact hard mask in the forward pass, sigmoid((s - threshold) / temperature) in
  the backward pass (straight-through).

`hard_topk_mask` is what inference uses: the k largest scores, ties broken by torch.topk.
"""

from __future__ import annotations

import torch


def topk_count(num_tokens: int, keep_ratio: float) -> int:
    """Tokens kept out of `num_tokens`: round(keep_ratio * N), at least 1, at most N."""
    return min(num_tokens, max(1, round(keep_ratio * num_tokens)))


def hard_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) scores -> (B, N) float 0/1 mask of the k largest per row."""
    idx = scores.detach().topk(k, dim=-1).indices
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


def sigmoid_topk_mask(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """(B, N) scores -> (B, N) mask: the exact hard top-k forward, a sigmoid straight-through backward.

    The sigmoid's threshold sits halfway between the k-th and (k+1)-th largest score, so every token,
    kept or not, gets a gradient pushing it across the boundary (vanishing for tokens many temperatures
    away from it).
    """
    n = scores.shape[-1]
    top = scores.detach().topk(min(k + 1, n), dim=-1)  # values (B, k+1) sorted descending
    hard = torch.zeros_like(scores).scatter_(-1, top.indices[..., :k], 1.0)
    if k < n:
        threshold = (top.values[..., k - 1] + top.values[..., k]) / 2
    else:  # everything kept: put the boundary just below the smallest score
        threshold = top.values[..., k - 1] - temperature
    x = (scores - threshold[..., None]) / temperature
    # sigmoid(x) for large x rounds to 1.0 in float32 and its gradient y * (1 - y) to 0; 1 - sigmoid(-x) has
    # the same value but keeps the gradient, so tokens far above the threshold still learn.
    soft = torch.where(x >= 0, 1 - torch.sigmoid(-x), torch.sigmoid(x))
    # hard + (soft - soft) is bit-exact `hard` in the forward pass; (hard + soft) - soft would not be.
    return hard + (soft - soft.detach())


class _PerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, sigma: float, noise: torch.Tensor) -> torch.Tensor:
        # scores (B, N), noise (S, B, N) -> (B, N) mean over S of the hard top-k of scores + sigma * noise
        perturbed = scores.detach()[None] + sigma * noise
        idx = perturbed.topk(k, dim=-1).indices  # (S, B, k)
        hard = torch.zeros_like(perturbed).scatter_(-1, idx, 1.0)  # (S, B, N)
        ctx.save_for_backward(hard, noise)
        ctx.sigma = sigma
        return hard.mean(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (B, N)
        hard, noise = ctx.saved_tensors
        # dL/ds_j = sum_i grad_i E[y_i Z_j] / sigma = E[<grad, y> Z_j] / sigma. Subtracting the mean <grad, y>
        # over the draws (a baseline: E[c Z] = 0) keeps the estimate's mean and cuts its variance.
        g = (hard * grad[None]).sum(-1, keepdim=True)  # (S, B, 1)
        g = g - g.mean(0, keepdim=True)
        return (g * noise).mean(0) / ctx.sigma, None, None, None


def perturbed_topk_mask(
    scores: torch.Tensor,
    k: int,
    sigma: float,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, N) scores -> (B, N) soft mask E[topk(scores + sigma Z)], Z ~ N(0, I); each row sums to k.

    The noise is drawn on the CPU from `generator` (so a seeded run is reproducible on any device), then
    moved to the scores' device. As sigma -> 0 the value tends to the hard top-k mask.
    """
    if num_samples < 1 or sigma <= 0:
        raise ValueError(f"perturbed top-k needs num_samples >= 1 and sigma > 0; got {num_samples}, {sigma}")
    noise = torch.randn((num_samples, *scores.shape), generator=generator, dtype=torch.float32)
    noise = noise.to(scores.device, scores.dtype)
    return _PerturbedTopK.apply(scores, k, sigma, noise)


def standardize(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, N) -> each row shifted and scaled to mean 0, standard deviation 1: the top-k noise's sigma is
    then in units of the row's spread, whatever scale the scorer's logits drift to."""
    mean = scores.mean(-1, keepdim=True)
    std = scores.std(-1, keepdim=True, unbiased=False)
    return (scores - mean) / (std + eps)
