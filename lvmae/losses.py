"""Reconstruction losses, as plain functions of (pred, target, weight).

`weight` (B, N_sel) is 1 for tokens that are both encoder-masked and decoder-selected and 0 otherwise;
every loss is a weighted mean over tokens, so tokens outside that set contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvmae.config import MAEConfig
from lvmae.fsq import codes_to_digits, digits_to_codes
from lvmae.mae import MAEOutput
from lvmae.tubelets import gather_tubelets, normalize_tubelets, pixel_targets


def _weighted_mean(per_token: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MSE: pred, target (B, N_sel, D), weight (B, N_sel) -> scalar."""
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return _weighted_mean(per_token, weight)


def token_softmax_loss(logits: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the full codebook: logits (B, N_sel, K), codes (B, N_sel) -> scalar."""
    per_token = F.cross_entropy(logits.float().transpose(1, 2), codes.long(), reduction="none")
    return _weighted_mean(per_token, weight)


def token_factorized_loss(
    logits: torch.Tensor, codes: torch.Tensor, levels: list[int], weight: torch.Tensor
) -> torch.Tensor:
    """One classifier per FSQ dimension: logits (B, N_sel, sum(levels)), codes (B, N_sel) -> scalar.

    The codebook (prod(levels), 64,000 for LVMAE's levels) never materializes: each token's loss is the
    mean cross-entropy of its d digits, each over levels_i classes.
    """
    digits = codes_to_digits(codes, levels)  # (B, N_sel, d)
    per_token = torch.zeros(codes.shape, device=logits.device)
    for i, part in enumerate(logits.float().split(list(levels), dim=-1)):
        per_token = per_token + F.cross_entropy(part.transpose(1, 2), digits[..., i], reduction="none")
    return _weighted_mean(per_token / len(levels), weight)


def predicted_codes(cfg: MAEConfig, pred: torch.Tensor) -> torch.Tensor:
    """The most likely code of each prediction: pred (B, N_sel, out_dim) token logits -> (B, N_sel) codes.
    Factorized heads pick each FSQ digit separately (the argmax of the product of per-digit softmaxes)."""
    tgt = cfg.target
    if tgt.kind != "tokens":
        raise ValueError("predicted codes need a model with token targets")
    if tgt.token_loss == "softmax":
        return pred.argmax(-1)
    digits = torch.stack([part.argmax(-1) for part in pred.split(list(tgt.fsq_levels), dim=-1)], dim=-1)
    return digits_to_codes(digits, list(tgt.fsq_levels))


def mae_loss(
    cfg: MAEConfig,
    out: MAEOutput,
    video: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss for a model config: pixel targets from `video`, or token targets from `codes`.

    video: (B, C, T, H, W); codes: (B, T', H', W') or (B, N) tokenizer codes.
    """
    plan = out.plan
    weight = plan.loss_weight()
    tgt = cfg.target
    if tgt.kind == "pixels":
        if video is None:
            raise ValueError("pixel targets need the video")
        t, p = cfg.video.tubelet_size, cfg.video.patch_size
        # Only the selected tubelets are normalized: the cost follows the decoder budget.
        target = gather_tubelets(video, plan.ids_selected, t, p)  # (B, N_sel, t*p*p*C)
        target = normalize_tubelets(target, t, p) if tgt.norm_pix else target.float()
        return pixel_loss(out.pred, target, weight)
    if codes is None:
        raise ValueError("token targets need the tokenizer's codes")
    flat = codes.reshape(codes.shape[0], -1).to(out.pred.device)
    selected = flat.gather(1, plan.ids_selected)
    if tgt.token_loss == "softmax":
        return token_softmax_loss(out.pred, selected, weight)
    return token_factorized_loss(out.pred, selected, list(tgt.fsq_levels), weight)


__all__ = [
    "mae_loss",
    "pixel_loss",
    "pixel_targets",
    "predicted_codes",
    "token_factorized_loss",
    "token_softmax_loss",
]
