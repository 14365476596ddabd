"""Scoring a fine-tuned classifier (`lvmae finetune` ends with it): multi-view logits on val and test.

    results = evaluate_classifier("RUN/export", "DATA", ["val", "test"], temporal_views=2)

Each clip is cut into views (temporal windows x spatial crops of the classifier's clip), their logits
averaged; top-1, top-5, per-class accuracy and the confusion matrix per split (evals.accuracy), written
to RUN/eval.json and RUN/confusion.png. RUN may be on object storage (s3://...): the export is fetched, and
the two files are written into the run's local stage and uploaded (train.rundir).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from evals.accuracy import scores
from evals.features import cut_views
from evals.figures import save_confusion
from lvmae.errors import UserError
from lvmae.weights import load_classifier, write_text_atomically
from train.rundir import RunDir, fetch_folder, is_url


@torch.inference_mode()
def split_logits(
    model: Any, loader: Any, temporal: int, spatial: int, batch: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits (N, C) averaged over views, labels (N,)) for every clip of the loader."""
    v = model.encoder.video
    device = next(model.parameters()).device
    logits, labels = [], []
    for b in loader:
        views = cut_views(b["video"], v.num_frames, v.img_size, temporal, spatial)  # (B, V, C, T, H, W)
        flat = torch.cat([model(x.to(device)).cpu() for x in views.flatten(0, 1).split(batch)])
        logits.append(flat.reshape(*views.shape[:2], -1).mean(1))
        labels.append(b["labels"])
    return torch.cat(logits), torch.cat(labels)


def evaluate_classifier(
    export: str | Path,
    dataset: str,
    splits: list[str],
    temporal_views: int = 1,
    spatial_views: int = 1,
    decoder: str = "auto",
    out: str | Path | None = None,
) -> dict[str, Any]:
    from train.loader import ClipLoader, LoaderError

    try:
        model, classes = load_classifier(fetch_folder(str(export)))
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {"classifier": str(export), "dataset": dataset, "classes": classes}
    results["views"] = f"{temporal_views}x{spatial_views}"
    results["pooling"] = model.pooling
    for split in splits:
        try:
            loader = ClipLoader(
                dataset,
                4,
                split=split,
                labels=True,
                decoder=decoder,
                shuffle_buffer=0,
                epochs=1,
                drop_last=False,
            )
        except LoaderError as err:
            raise UserError(str(err)) from None
        if loader.classes != classes:
            raise UserError(
                f"{dataset} has classes {loader.classes}; the classifier was trained on {classes}"
            )
        logits, labels = split_logits(model, loader, temporal_views, spatial_views)
        results[split] = scores(logits, labels, classes)
    run = RunDir(str(out) if out else parent_of(str(export)))
    target = run.local
    target.mkdir(parents=True, exist_ok=True)
    write_text_atomically(target / "eval.json", json.dumps(results, indent=1) + "\n")
    run.upload("eval.json")
    results["json"] = run.uri("eval.json")
    last = splits[-1]
    save_confusion(results[last], classes, target / "confusion.png", {"random_init": False})
    run.upload("confusion.png")
    results["confusion_png"] = run.uri("confusion.png")
    return results


def parent_of(export: str) -> str:
    """The run folder of an export folder (a path or a URL)."""
    return export.rstrip("/").rsplit("/", 1)[0] if is_url(export) else str(Path(export).parent)
