"""`lvmae eval probe`: how good is a pretrained encoder? An attentive probe on its frozen features.

    lvmae eval probe RUN/export DATA [--frames 32 --views 4x1] [--random-init] [--out DIR]

1. The encoder comes from an export (RUN/export), a run folder, or a checkpoint (step-N/, rebuilt from its
   ZeRO shards), on a local path or object storage (train.pretrained), rebuilt for the probe's clip
   (`--frames`, `--size`: positions recomputed for the grid).
2. Labelled clips stream through the training loader, split by source video at ingest (train / val /
   test); each clip is cut into views (temporal windows x spatial crops) and the frozen encoder's tokens
   for every view are computed once and cached (OUT/features/, keyed by encoder, data and views:
   evals.features).
3. An attentive probe (lvmae.heads.AttentiveProbe) trains on the train split's views, AdamW with warmup
   and cosine decay, seeded; no model selection on the test split: a fixed number of epochs.
4. Val and test: logits averaged over a clip's views; top-1, top-5, per-class accuracy, the confusion
   matrix (JSON and OUT/confusion.png), and a few test clips with true and predicted labels
   (OUT/examples.png). `--random-init` probes the same architecture untrained: the baseline.

The probe trains in this process on cached features (seconds at the sizes this runs on); fine-tuning the
whole encoder (`lvmae finetune`) is what goes through the DeepSpeed trainer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evals.accuracy import scores
from evals.features import cached_features, digest, extract
from evals.figures import save_confusion, save_examples
from lvmae.config import ConfigError
from lvmae.errors import UserError
from lvmae.heads import AttentiveProbe, check_encoder_state, encoder_config, encoder_for
from lvmae.weights import replace_atomically, write_text_atomically
from train.pretrained import load_pretrained


@dataclass
class ProbeConfig:
    frames: int | None = None  # the encoder's clip length for the probe (default: its pretraining length)
    size: int | None = None  # its clip side (default: its pretraining size)
    temporal_views: int = 1  # windows of `frames` per clip, evenly spread
    spatial_views: int = 1  # crops of `size` per window, along the diagonal
    epochs: int = 100  # the cached features make epochs cheap; small data sets need many steps
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_share: float = 0.1  # of the probe's steps
    label_smoothing: float = 0.0
    num_heads: int = 4
    # channel: standardize each feature channel with the training features' statistics (MAE's BatchNorm
    # before its linear probe); none: the raw tokens (docs/evaluation.md: what each does to which encoder)
    feature_norm: str = "channel"
    seed: int = 0
    random_init: bool = False
    decoder: str = "auto"  # clip decoder backend, as data.decoder
    extract_batch: int = 8  # views per encoder forward

    def validate(self) -> None:
        for name in ("temporal_views", "spatial_views", "epochs", "batch_size", "num_heads", "extract_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"probe {name}: must be at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.warmup_share < 1:
            raise ConfigError("probe lr must be > 0, weight_decay >= 0, warmup_share in [0, 1)")
        if self.feature_norm not in ("channel", "none"):
            raise ConfigError(f"probe feature_norm: must be channel or none; got {self.feature_norm!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("probe label_smoothing: must be in [0, 1)")


# --- the probe ----------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ProbeConfig
) -> tuple[AttentiveProbe, list[float]]:
    """features (N, V, tokens, D): each view a training sample of its clip's label -> (probe, loss per
    epoch). Deterministic from cfg.seed."""
    v = features.shape[1]
    x = features.flatten(0, 1)  # (N*V, tokens, D)
    y = labels.repeat_interleave(v)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    probe = AttentiveProbe(features.shape[-1], num_classes, cfg.num_heads)
    if cfg.feature_norm == "channel":
        probe.set_feature_stats(x[:: max(1, len(x) // 64)])  # a strided sample of the training views
    decay = [p for name, p in probe.named_parameters() if p.ndim > 1 and name != "pool.query"]
    other = [p for name, p in probe.named_parameters() if not (p.ndim > 1 and name != "pool.query")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, int(cfg.warmup_share * total))
    )
    curve = []
    probe.train()
    for _ in range(cfg.epochs):
        order, losses = torch.randperm(len(x), generator=gen), []
        for i in range(per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            loss = F.cross_entropy(probe(x[idx].float()), y[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        curve.append(sum(losses) / len(losses))
    probe.eval()
    return probe, curve


@torch.inference_mode()
def view_logits(probe: torch.nn.Module, features: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """features (N, V, tokens, D) -> logits (N, C), the mean over each clip's views."""
    n, v = features.shape[:2]
    flat = features.flatten(0, 1)
    out = torch.cat([probe(x.float()) for x in flat.split(batch)])
    return out.reshape(n, v, -1).mean(1)


# --- the command ----------------------------------------------------------------------------------------


def check_classes(loader_counts: dict[str, dict[str, int]], split: str) -> None:
    """Every class of an evaluated split must have training samples: the probe cannot predict others."""
    train = loader_counts.get("train", {})
    unknown = sorted(c for c, n in loader_counts.get(split, {}).items() if n and not train.get(c))
    if unknown:
        raise UserError(
            f"classes {', '.join(unknown)} have {split} samples but no training samples: the probe "
            "cannot learn them; ingest with other split shares or seed"
        )


def run_probe(source: str, dataset: str, cfg: ProbeConfig, out: str | None = None) -> dict[str, Any]:
    """The command: checks first (one clear line each), then features, probe, scores and pictures."""
    from train.loader import ClipLoader, LoaderError

    cfg.validate()
    started = time.perf_counter()
    mae_cfg, state, loaded = load_pretrained(source)
    frames = cfg.frames or mae_cfg.video.num_frames
    size = cfg.size or mae_cfg.video.img_size
    try:
        encoder_config(mae_cfg, frames, size)
        check_encoder_state(mae_cfg, state, loaded)
    except ConfigError as err:
        raise UserError(str(err)) from None

    def loader(split: str) -> ClipLoader:
        return ClipLoader(
            dataset,
            4,
            split=split,
            labels=True,
            decoder=cfg.decoder,
            shuffle_buffer=0,
            epochs=1,
            drop_last=False,
        )

    try:
        train_loader = loader("train")
        counts = train_loader.store.read_json("index.json")["labels"]["counts"]
        splits = [s for s in ("val", "test") if sum(counts.get(s, {}).values())]
        if "test" not in splits:
            raise LoaderError(f"{dataset} has no test samples: ingest with --test-share > 0")
        eval_loaders = {s: loader(s) for s in splits}
    except LoaderError as err:
        raise UserError(str(err)) from None
    for s in splits:
        check_classes(counts, s)
    spec = train_loader.spec
    if spec["num_frames"] < frames or spec["size"] < size:
        raise UserError(
            f"the probe's encoder takes {frames}-frame {size} px views; {dataset} holds "
            f"{spec['num_frames']}-frame {spec['size']} px clips (set --frames / --size to at most those)"
        )
    classes = train_loader.classes

    torch.manual_seed(cfg.seed)
    encoder = encoder_for(mae_cfg, None if cfg.random_init else state, frames, size)
    encoder.to("cuda" if torch.cuda.is_available() else "cpu")  # features on the GPU; the probe on the CPU
    key = digest(
        None if cfg.random_init else state,
        cfg.random_init and cfg.seed,
        asdict(mae_cfg.encoder),
        frames,
        size,
        cfg.temporal_views,
        cfg.spatial_views,
        dataset,
        spec,
    )
    target = Path(out) if out else Path("probe-out")
    target.mkdir(parents=True, exist_ok=True)
    feats = {}
    for split, ld in {"train": train_loader, **eval_loaders}.items():
        keep = 6 if split == "test" else 0
        cache = target / "features" / f"{key}-{split}.safetensors"
        feats[split] = cached_features(
            cache,
            lambda ld=ld, keep=keep: extract(
                encoder,
                ld,
                frames,
                size,
                cfg.temporal_views,
                cfg.spatial_views,
                cfg.extract_batch,
                keep,
            ),
        )
    extracted = time.perf_counter()

    probe, curve = train_probe(feats["train"]["features"], feats["train"]["labels"], len(classes), cfg)
    results: dict[str, Any] = {
        "source": loaded,
        "dataset": dataset,
        "random_init": cfg.random_init,
        "classes": classes,
        "encoder": {
            "preset": mae_cfg.preset,
            "pretrained_frames": mae_cfg.video.num_frames,
            "pretrained_size": mae_cfg.video.img_size,
            "frames": frames,
            "size": size,
            "views": f"{cfg.temporal_views}x{cfg.spatial_views}",
        },
        "probe": asdict(cfg),
        "num_train_clips": len(feats["train"]["labels"]),
        "train_loss_first_last": [round(curve[0], 4), round(curve[-1], 4)],
    }
    for split in splits:
        logits = view_logits(probe, feats[split]["features"])
        results[split] = scores(logits, feats[split]["labels"], classes)
        if split == "test":
            test_pred = logits.argmax(1)
    results["seconds"] = {
        "features": round(extracted - started, 2),
        "probe": round(time.perf_counter() - extracted, 2),
    }
    write_text_atomically(target / "probe.json", json.dumps(results, indent=1) + "\n")
    results["json"] = str(target / "probe.json")
    save_probe(probe, classes, target / "probe.safetensors")
    results["weights"] = str(target / "probe.safetensors")
    results["confusion_png"] = str(
        save_confusion(results["test"], classes, target / "confusion.png", results)
    )
    examples = feats["test"]["examples"]
    if examples:
        names = [(classes[int(t)], classes[int(p)]) for t, p in zip(feats["test"]["labels"], test_pred)]
        results["examples_png"] = str(save_examples(examples, names, target / "examples.png", results))
    return results


def save_probe(probe: AttentiveProbe, classes: list[str], path: Path) -> None:
    """The trained probe (safetensors, class names in its metadata), written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in probe.state_dict().items()}
    meta = {"format": "lvmae-attentive-probe", "classes": json.dumps(classes)}
    replace_atomically(path.parent, path.name, lambda p: save_file(tensors, p, metadata=meta))


def summary_line(r: dict[str, Any]) -> str:
    t = r["test"]
    kind = "random-init" if r["random_init"] else "pretrained"
    topk = next(k for k in t if k.startswith("top") and k != "top1")
    return (
        f"{kind} encoder ({r['encoder']['frames']} frames x {r['encoder']['size']} px, views "
        f"{r['encoder']['views']}): test top-1 {100 * t['top1']:.1f}%, {topk} {100 * t[topk]:.1f}% on "
        f"{t['num_clips']} clips (chance {100 * t['chance']:.0f}%)"
        + (f"; val top-1 {100 * r['val']['top1']:.1f}%" if "val" in r else "")
    )
