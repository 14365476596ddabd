"""`lvmae eval probe`: how good is a pretrained encoder? An attentive probe on its frozen features.

    lvmae eval probe RUN/export DATA [--frames 32 --views 4x1] [--random-init] [--out DIR]

1. The encoder comes from an export (RUN/export), a run folder, or a checkpoint (step-N/, rebuilt from its
   ZeRO shards), rebuilt for the probe's clip (`--frames`, `--size`: positions recomputed for the grid).
   Any of them may be on object storage (s3://...): its files are fetched first (train.rundir).
2. Labelled clips stream through the training loader, split by source video at ingest (train / val /
   test); each clip is cut into views (temporal windows x spatial crops) and the frozen encoder's tokens
   for every view are computed once and cached (OUT/features/, keyed by encoder, data and views).
3. An attentive probe (lvmae.heads.AttentiveProbe) trains on the train split's views, AdamW with warmup
   and cosine decay, seeded; no model selection on the test split: a fixed number of epochs.
4. Val and test: logits averaged over a clip's views; top-1, top-5, per-class accuracy, the confusion
   matrix (JSON and OUT/confusion.png), and a few test clips with true and predicted labels
   (OUT/examples.png). `--random-init` probes the same architecture untrained: the baseline.

The probe trains in this process on cached features (seconds at the sizes this runs on); fine-tuning the
whole encoder (`lvmae finetune`) is what goes through the DeepSpeed trainer.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lvmae.config import ConfigError, MAEConfig, load_saved_model_config
from lvmae.errors import UserError
from lvmae.heads import AttentiveProbe, check_encoder_state, encoder_config, encoder_for
from lvmae.mae import VideoViT
from lvmae.weights import MAE_CONFIG, MAE_WEIGHTS, write_text_atomically
from train.rundir import default_stage_dir, fetch_folder, is_url, run_name


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


# --- the encoder --------------------------------------------------------------------------------------


def load_source(source: str) -> tuple[MAEConfig, dict[str, torch.Tensor], str]:
    """An export folder, a run folder (its export/), or a checkpoint folder -> (model config, MAE state
    dict, what was loaded). One clear UserError for anything else."""
    from safetensors.torch import load_file

    if is_url(source):
        return _from_store(source)
    path = Path(source)
    if (path / "export" / MAE_CONFIG).is_file():
        path = path / "export"
    if (path / MAE_CONFIG).is_file() and (path / MAE_WEIGHTS).is_file():
        try:
            cfg = load_saved_model_config(path / MAE_CONFIG)
        except ConfigError as err:
            raise UserError(f"{path / MAE_CONFIG} is not an LVMAE model config: {err}") from None
        return cfg.resolved(), load_file(path / MAE_WEIGHTS, device="cpu"), f"export {path}"
    if (path / "meta.json").is_file() and (path / "config.yaml").is_file():
        return _from_checkpoint(path)
    raise UserError(
        f"{source} is neither an exported model (config.yaml + model.safetensors), a run folder with "
        "export/, nor a checkpoint folder (step-N with meta.json)"
    )


def _from_store(url: str) -> tuple[MAEConfig, dict[str, torch.Tensor], str]:
    """load_source for a URL: the export, run folder or checkpoint is fetched into its stage folder
    (train.rundir.default_stage_dir; a checkpoint with every rank's shards, as zero_to_fp32 needs them)."""
    from ingest.storage import Store

    url = url.rstrip("/")
    store = Store(url)
    if store.exists(f"export/{MAE_CONFIG}"):
        url = f"{url}/export"
        store = Store(url)
    if store.exists("meta.json"):
        local = fetch_folder(url, default_stage_dir(url) / run_name(url))  # zero_to_fp32 reads PARENT/step-N
    elif store.exists(MAE_CONFIG):
        local = fetch_folder(url)
    else:
        raise UserError(
            f"{url} is neither an exported model (config.yaml + model.safetensors), a run folder with "
            "export/, nor a checkpoint folder (step-N with meta.json)"
        )
    cfg, state, what = load_source(str(local))
    return cfg, state, f"{what.split(' ', 1)[0]} {url}"


def _from_checkpoint(path: Path) -> tuple[MAEConfig, dict[str, torch.Tensor], str]:
    """A ZeRO checkpoint of `lvmae train mae`, its full-precision weights rebuilt from the rank shards
    (DeepSpeed's zero_to_fp32; the files are this project's own checkpoints)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from train.config import load_saved_train_config

    try:
        cfg = load_saved_train_config(path / "config.yaml").model_config()
    except ConfigError as err:
        raise UserError(f"{path} is not a checkpoint of `lvmae train mae`: {err}") from None
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return cfg, {k: v.float() for k, v in state.items()}, f"checkpoint {path}"


def digest(state: dict[str, torch.Tensor] | None, *extra: Any) -> str:
    """Short fingerprint of an encoder's weights (or random init) and settings: the feature cache key."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for k in sorted(state or {}):
        if k.startswith("encoder."):
            h.update(k.encode())
            h.update(state[k].float().numpy().tobytes())  # type: ignore[index]
    return h.hexdigest()[:16]


# --- views and features ---------------------------------------------------------------------------------


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
    encoder: VideoViT, loader: Any, cfg: ProbeConfig, frames: int, size: int, keep_examples: int = 0
) -> dict[str, Any]:
    """Every clip of the loader -> {"features" (N, V, tokens, D) float16, "labels" (N,), "keys",
    "examples" (up to keep_examples clips (3, T, H, W) float)}."""
    from tqdm import tqdm

    encoder.eval()
    feats, labels, keys, examples = [], [], [], []
    total = getattr(loader.filter, "num_samples", None)
    with tqdm(total=total, desc=f"features {loader.split}", unit="clip", leave=False) as bar:
        for batch in loader:
            views = cut_views(batch["video"], frames, size, cfg.temporal_views, cfg.spatial_views)
            b, v = views.shape[:2]
            flat = views.flatten(0, 1)
            device = next(encoder.parameters()).device  # the GPU where there is one
            out = torch.cat(
                [encoder(x.to(device)).cpu() for x in flat.split(cfg.extract_batch)]
            )  # (B*V, N, D)
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

    from lvmae.weights import replace_atomically

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
    mae_cfg, state, loaded = load_source(source)
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
            cache, lambda ld=ld, keep=keep: extract(encoder, ld, cfg, frames, size, keep)
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

    from lvmae.weights import replace_atomically

    tensors = {k: v.detach().contiguous() for k, v in probe.state_dict().items()}
    meta = {"format": "lvmae-attentive-probe", "classes": json.dumps(classes)}
    replace_atomically(path.parent, path.name, lambda p: save_file(tensors, p, metadata=meta))


def save_confusion(s: dict[str, Any], classes: list[str], path: Path, results: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(s["confusion"]).float()
    share = m / m.sum(1, keepdim=True).clamp(min=1)
    side = 1.2 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j, i, int(m[i, j]), ha="center", va="center", color="black" if share[i, j] < 0.6 else "white"
            )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    kind = "random-init" if results["random_init"] else "pretrained"
    ax.set_title(f"{kind} encoder, test top-1 {100 * s['top1']:.0f}% ({s['num_clips']} clips)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def example_frames(clip: torch.Tensor, n: int = 8) -> list[int]:
    """n frame numbers of a clip (3, T, H, W), in time order: the frames that differ most from the clip's
    median frame (brief events), topped up with evenly spaced ones."""
    t = clip.shape[1]
    deviation = (clip - clip.median(dim=1, keepdim=True).values).abs().mean((0, 2, 3))  # (T,)
    picks: list[int] = []
    for f in deviation.argsort(descending=True).tolist():
        if len(picks) == n // 2:
            break
        if all(abs(f - p) > 2 for p in picks):  # one frame per event
            picks.append(f)
    for f in (round(i * (t - 1) / (n - 1)) for i in range(n)):
        if len(picks) < n and f not in picks:
            picks.append(f)
    return sorted(picks)


def save_examples(clips: list[torch.Tensor], names: list[tuple[str, str]], path: Path, results: dict) -> Path:
    """A row per test clip (3, T, H, W): eight of its frames (the most unusual ones and evenly spaced
    ones), with the true and predicted class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    fig, axes = plt.subplots(len(clips), cols, figsize=(1.4 * cols + 1.6, 1.55 * len(clips)), squeeze=False)
    for r, (clip, (true, pred)) in enumerate(zip(clips, names)):
        frames = clip.permute(1, 2, 3, 0).clamp(0, 1)  # (T, H, W, 3)
        for c, f in enumerate(example_frames(clip, cols)):
            ax = axes[r][c]
            ax.imshow(frames[f].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"frame {f}", fontsize=7)
        mark = "right" if true == pred else "WRONG"
        axes[r][0].set_ylabel(f"true: {true}\npredicted:\n{pred}\n({mark})", fontsize=7)
    kind = "random-init" if results["random_init"] else "pretrained"
    fig.suptitle(
        f"test clips, {kind} encoder probe (top-1 {100 * results['test']['top1']:.0f}%)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
