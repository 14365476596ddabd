"""Differentiable top-k: exact counts, the perturbed maximum's limit and gradients (against the closed
form for two tokens), and the sigmoid straight-through kept as an option."""

from __future__ import annotations

import math

import pytest
import torch

from lvmae.topk import (
    hard_topk_mask,
    perturbed_topk_mask,
    sigmoid_topk_mask,
    standardize,
    topk_count,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n,ratio,k", [(37, 0.25, 9), (10, 0.01, 1), (12, 1.0, 12), (100, 0.15, 15)])
def test_topk_count(n: int, ratio: float, k: int) -> None:
    assert topk_count(n, ratio) == k


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0])
def test_perturbed_rows_sum_to_k(sigma: float) -> None:
    scores = torch.randn(4, 50, generator=gen(1))
    mask = perturbed_topk_mask(scores, 12, sigma, 32, gen(2))
    assert mask.shape == scores.shape
    assert ((mask >= 0) & (mask <= 1)).all()
    torch.testing.assert_close(mask.sum(1), torch.full((4,), 12.0))
    # Each draw keeps exactly k, so the mean takes values in multiples of 1 / samples.
    assert torch.allclose(mask * 32, (mask * 32).round(), atol=1e-4)


def test_perturbed_tends_to_hard_topk_as_sigma_shrinks() -> None:
    scores = torch.randn(3, 40, generator=gen(3))
    hard = hard_topk_mask(scores, 10)
    gaps = []
    for sigma in (1.0, 0.1, 0.01, 1e-4):
        gaps.append((perturbed_topk_mask(scores, 10, sigma, 64, gen(4)) - hard).abs().sum().item())
    assert gaps[-1] == 0.0
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0


def test_perturbed_gradient_matches_closed_form() -> None:
    # Two tokens, k = 1: E[y_1] = Phi((s1 - s2) / (sigma sqrt 2)), so dE[y_1]/ds1 = phi(.) / (sigma sqrt 2).
    sigma, s1, s2 = 0.5, 0.3, 0.0
    scores = torch.tensor([[s1, s2]], requires_grad=True)
    mask = perturbed_topk_mask(scores, 1, sigma, 200_000, gen(5))
    mask[0, 0].backward()
    x = (s1 - s2) / (sigma * math.sqrt(2))
    want = math.exp(-x * x / 2) / math.sqrt(2 * math.pi) / (sigma * math.sqrt(2))
    assert scores.grad is not None
    assert scores.grad[0, 0].item() == pytest.approx(want, rel=0.03)
    assert scores.grad[0, 1].item() == pytest.approx(-want, rel=0.03)
    p = 0.5 * (1 + math.erf(x / math.sqrt(2)))
    assert mask[0, 0].item() == pytest.approx(p, abs=0.005)


def test_tokens_far_below_the_threshold_still_learn() -> None:
    # Token 0 sits 2 sigma below the boundary of the top 4 of 16: it is rarely kept, and a loss that
    # rewards keeping it must still push its score up. The sigmoid straight-through, 20 temperatures
    # away, gives it almost nothing.
    scores = torch.linspace(3, 0, 16)[None].clone()
    others = scores[0, 1:].sort(descending=True).values
    threshold = (others[3] + others[4]) / 2  # between the 4th and 5th of the other tokens
    scores[0, 0] = threshold - 2 * 0.5
    reward = torch.zeros(16)
    reward[0] = 1.0
    s = scores.clone().requires_grad_()
    (-(perturbed_topk_mask(s, 4, 0.5, 20_000, gen(6)) * reward).sum()).backward()
    assert s.grad is not None and s.grad[0, 0].item() < -0.01  # descend: raise token 0's score

    s2 = scores.clone().requires_grad_()
    (-(sigmoid_topk_mask(s2, 4, temperature=0.05) * reward).sum()).backward()
    assert s2.grad is not None and abs(s2.grad[0, 0].item()) < 1e-6


def test_perturbed_is_reproducible_from_the_generator() -> None:
    scores = torch.randn(2, 30, generator=gen(7))
    a = perturbed_topk_mask(scores, 5, 0.5, 8, gen(8))
    b = perturbed_topk_mask(scores, 5, 0.5, 8, gen(8))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num_samples"):
        perturbed_topk_mask(scores, 5, 0.5, 0)


def test_sigmoid_topk_exact_forward_and_gradient_everywhere() -> None:
    g = gen(0)
    for n, ratio in [(37, 0.25), (10, 0.01), (12, 1.0), (100, 0.5)]:
        scores = torch.rand(4, n, generator=g).requires_grad_()
        k = topk_count(n, ratio)
        mask = sigmoid_topk_mask(scores, k, temperature=0.05)
        assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
        assert (mask.detach().sum(1) == k).all()
        assert torch.equal(mask.detach(), hard_topk_mask(scores, k))
        # Weighting every token differently makes each token's gradient its own sigmoid slope.
        (mask * torch.linspace(1, 2, n)).sum().backward()
        assert scores.grad is not None and torch.isfinite(scores.grad).all()
        assert (scores.grad != 0).all(), "every token, kept or not, must get a gradient"


def test_ties_keep_exactly_k() -> None:
    scores = torch.full((3, 20), 0.5)
    assert (sigmoid_topk_mask(scores, 5, 0.05).sum(1) == 5).all()
    assert (hard_topk_mask(scores, 5).sum(1) == 5).all()
    torch.testing.assert_close(perturbed_topk_mask(scores, 5, 0.5, 16, gen(9)).sum(1), torch.full((3,), 5.0))


def test_standardize() -> None:
    x = torch.randn(3, 100, generator=gen(10)) * 7 + 3
    y = standardize(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
