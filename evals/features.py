"""A frozen encoder's features of a labelled data set: clips cut into views, encoded once, cached.

    views = cut_views(video, frames=32, size=224, temporal=4, spatial=1)  # (B, V, C, T, H, W)
    got = cached_features(cache, lambda: extract(encoder, loader, 4, 1, 32, 224))  # features, labels, keys

Each clip is cut into views (temporal windows x spatial crops along the diagonal); the encoder's tokens
for every view are computed once and cached (safetensors, keyed by digest(): the encoder's weights and
every setting that changes the features). Used by the probe (evals.probe) and the fine-tuned
classifier's evaluation (evals.classifier_eval).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lvmae.mae import VideoViT
from lvmae.weights import replace_atomically


def digest(state: dict[str, torch.Tensor] | None, *extra: Any) -> str:
    """Short fingerprint of an encoder's weights (or random init) and settings: the feature cache key."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for k in sorted(state or {}):
        if k.startswith("encoder."):
            h.update(k.encode())
            h.update(state[k].float().numpy().tobytes())  # type: ignore[index]
    return h.hexdigest()[:16]


def view_starts(length: int, window: int, n: int) -> list[int]:
    """Starts of n windows of `window` in `length`, evenly spread (one: centred)."""
    if window > length:
        raise ValueError(f"a window of {window} does not fit in {length}")
    if n == 1:
        return [(length - window) // 2]
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def cut_views(video: torch.Tensor, frames: int, size: int, temporal: int, spatial: int) -> torch.Tensor:
    """video (B, C, T, H, W) -> (B, temporal * spatial, C, frames, size, size): windows in time, each cut
    into crops along the diagonal (top-left to bottom-right), in that order."""
    t, h, w = video.shape[2:]
    out = []
    for t0 in view_starts(t, frames, temporal):
        for y0, x0 in zip(view_starts(h, size, spatial), view_starts(w, size, spatial)):
            out.append(video[:, :, t0 : t0 + frames, y0 : y0 + size, x0 : x0 + size])
    return torch.stack(out, dim=1)


@torch.inference_mode()
def extract(
    encoder: VideoViT,
    loader: Any,
    frames: int,
    size: int,
    temporal: int = 1,
    spatial: int = 1,
    batch_views: int = 8,
    keep_examples: int = 0,
) -> dict[str, Any]:
    """Every clip of the loader, cut into temporal x spatial views of frames x size x size, through the
    encoder (batch_views views a forward) -> {"features" (N, V, tokens, D) float16, "labels" (N,), "keys",
    "examples" (up to keep_examples clips (3, T, H, W) float)}."""
    from tqdm import tqdm

    encoder.eval()
    feats, labels, keys, examples = [], [], [], []
    total = getattr(loader.filter, "num_samples", None)
    with tqdm(total=total, desc=f"features {loader.split}", unit="clip", leave=False) as bar:
        for batch in loader:
            views = cut_views(batch["video"], frames, size, temporal, spatial)
            b, v = views.shape[:2]
            flat = views.flatten(0, 1)
            device = next(encoder.parameters()).device  # the GPU where there is one
            out = torch.cat([encoder(x.to(device)).cpu() for x in flat.split(batch_views)])  # (B*V, N, D)
            feats.append(out.reshape(b, v, *out.shape[1:]).half())
            labels.append(batch["labels"])
            keys += batch["keys"]
            if len(examples) < keep_examples:
                examples += list(batch["video"][: keep_examples - len(examples)])
            bar.update(b)
    return {"features": torch.cat(feats), "labels": torch.cat(labels), "keys": keys, "examples": examples}


def cached_features(cache: Path, compute: Any) -> dict[str, Any]:
    """compute() once per cache file (safetensors: features, labels, example clips as uint8; keys in its
    metadata)."""
    from safetensors.torch import load_file, save_file

    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            keys = json.loads(f.metadata()["keys"])
        t = load_file(cache)
        examples = list(t["examples"].float() / 255) if "examples" in t else []
        return {"features": t["features"], "labels": t["labels"], "keys": keys, "examples": examples}
    got = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": got["features"].contiguous(), "labels": got["labels"].contiguous()}
    if got["examples"]:
        tensors["examples"] = (torch.stack(got["examples"]).clamp(0, 1) * 255).round().to(torch.uint8)
    replace_atomically(
        cache.parent, cache.name, lambda p: save_file(tensors, p, metadata={"keys": json.dumps(got["keys"])})
    )
    return got
