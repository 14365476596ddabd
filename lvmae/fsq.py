"""Scalar quantizers for the tokenizer: FSQ (finite scalar quantization) and LFQ (lookup-free).

Latents are channel-last: z (..., d). Codes are integer ids in [0, codebook_size).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through)."""
    return x + (x.round() - x).detach()


def fsq_basis(levels: list[int]) -> list[int]:
    """Mixed-radix place values: code = sum(digit_i * basis_i)."""
    return [math.prod(levels[:i]) for i in range(len(levels))]


def codes_to_digits(codes: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """(...,) int codes -> (..., d) digits, digit_i in [0, levels_i)."""
    basis = torch.tensor(fsq_basis(levels), device=codes.device)
    lv = torch.tensor(levels, device=codes.device)
    return (codes.long()[..., None] // basis) % lv


def digits_to_codes(digits: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """(..., d) digits -> (...,) int64 codes."""
    basis = torch.tensor(fsq_basis(levels), device=digits.device)
    return (digits.long() * basis).sum(-1)


class Quantized(NamedTuple):
    """A NamedTuple so that DeepSpeed ZeRO-3's module hooks see the tensors (see lvmae.mae.MAEOutput)."""

    z_q: torch.Tensor  # (..., d) quantized latents, gradients pass straight through
    codes: torch.Tensor  # (...,) int64 code ids
    aux_loss: torch.Tensor  # scalar; zero for FSQ


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al., 2023): bound each channel, round to `levels_i` values."""

    def __init__(self, levels: list[int], eps: float = 1e-3):
        super().__init__()
        self.levels = list(levels)
        self.eps = eps
        lv = torch.tensor(self.levels, dtype=torch.float32)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_half_width", (lv // 2), persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash z so that rounding gives exactly `levels_i` values per channel."""
        half = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> Quantized:
        q = round_ste(self.bound(z.float()))  # integers in [-L//2, (L-1)//2]
        digits = (q + self._half_width).round().long()
        return Quantized(q / self._half_width, digits_to_codes(digits, self.levels), z.new_zeros(()))

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """(...,) codes -> (..., d) normalized latents, as forward() would produce."""
        digits = codes_to_digits(codes, self.levels).float()
        return (digits - self._half_width) / self._half_width


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class LFQ(nn.Module):
    """Lookup-free quantization (MAGVIT-v2): each channel becomes a bit, z_q = sign(z).

    The entropy regularizer uses independent per-bit probabilities p_i = sigmoid(2 z_i / tau), so it stays
    cheap for any number of bits: minimise each token's bit entropy (confident codes) and maximise the
    batch's mean bit entropy (all codes in use). A commitment term keeps z near +-1: with a
    straight-through sign, nothing else stops the latents from growing without bound.
    """

    def __init__(
        self, bits: int, entropy_weight: float = 0.1, tau: float = 1.0, commitment_weight: float = 0.25
    ):
        super().__init__()
        self.bits = bits
        self.entropy_weight = entropy_weight
        self.tau = tau
        self.commitment_weight = commitment_weight

    @property
    def codebook_size(self) -> int:
        return 2**self.bits

    def forward(self, z: torch.Tensor) -> Quantized:
        z = z.float()
        hard = torch.where(z > 0, 1.0, -1.0)
        z_q = z + (hard - z).detach()
        place = 2 ** torch.arange(self.bits, device=z.device)
        codes = ((z > 0).long() * place).sum(-1)
        aux = z.new_zeros(())
        if self.training and self.commitment_weight > 0:
            aux = aux + self.commitment_weight * (z - hard).pow(2).mean()
        if self.training and self.entropy_weight > 0:
            p = torch.sigmoid(2 * z / self.tau).reshape(-1, self.bits)
            per_token = _binary_entropy(p).sum(-1).mean()
            codebook = _binary_entropy(p.mean(0)).sum()
            aux = aux + self.entropy_weight * (per_token - codebook)
        return Quantized(z_q, codes, aux)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        place = 2 ** torch.arange(self.bits, device=codes.device)
        return torch.where((codes.long()[..., None] // place) % 2 == 1, 1.0, -1.0)
