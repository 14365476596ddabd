"""Scores of class predictions: top-1, top-k, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from typing import Any

import torch


def scores(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Top-1, top-k (k = min(5, classes)), per-class accuracy and the confusion matrix (rows: true)."""
    c = len(classes)
    k = min(5, c)
    pred = logits.argmax(1)
    confusion = torch.zeros(c, c, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = {
        name: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
        for i, name in enumerate(classes)
    }
    topk = (logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean()
    return {
        "num_clips": len(labels),
        "top1": round(float((pred == labels).float().mean()), 4),
        f"top{k}": round(float(topk), 4),
        "per_class": {n: None if a is None else round(a, 4) for n, a in per_class.items()},
        "confusion": confusion.tolist(),
        "chance": round(1.0 / c, 4),
    }
