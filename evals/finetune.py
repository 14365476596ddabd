"""`lvmae finetune`: a pretrained encoder fine-tuned with a classifier on labelled clips, on the pretraining
trainer (train.trainer), then scored on val and test (evals.classifier_eval).

    cfg = load_finetune_config(["configs/finetune_demo_cpu.yaml"], ["finetune.init_from=RUN/export"])
    task = FinetuneTask(cfg)             # the encoder from train.pretrained.load_pretrained
    train(task, cfg)                     # layer-wise lr decay, drop path, label smoothing, mixup

The recipe is VideoMAE's: mean pooling (`finetune.pooling`), fc_norm and a linear head; AdamW with
layer-wise lr decay; a random window and crop of the clip per step; label smoothing and optional mixup.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ingest.labels import SPLITS
from lvmae.config import POOLINGS, SAVED_CLASSIFIER_DEFAULTS, ConfigError, check, check_choice, load_config
from lvmae.heads import VideoClassifier, check_encoder_state, encoder_config, encoder_for, layer_id
from lvmae.weights import save_classifier
from train.config import DataConfig, OptimConfig, RunConfig, validate_training
from train.pretrained import load_pretrained
from train.tasks import Batch, Task


@dataclass
class FinetuneSpec:
    """What `lvmae finetune` starts from and how: VideoMAE's fine-tuning recipe (layer-wise lr decay, drop
    path, label smoothing, optional mixup), then a multi-view evaluation of the result."""

    init_from: str = "???"  # an exported MAE (RUN/export) or its run folder: the encoder and its shape
    random_init: bool = False  # the same encoder shape, untrained: the baseline
    num_frames: int | None = None  # the clip length the encoder runs on (default: its pretraining length)
    img_size: int | None = None  # its clip side (default: its pretraining size)
    drop_path: float = 0.1
    head_dropout: float = 0.0
    # How the classifier pools the tokens (lvmae.heads.VideoClassifier): `videomae` (mean of the last
    # block's tokens, fc_norm, linear: VideoMAE's head, exported exactly by `lvmae export hf`) or
    # `norm_mean` (the encoder's final norm on every token first: what lvmae fine-tuned before this option).
    pooling: str = "videomae"
    layer_decay: float = 0.75  # block i of L gets lr * layer_decay ** (L + 1 - (i + 1)); 1 disables
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of clips and labels; 0 disables
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])  # scored after training
    temporal_views: int = 1  # evaluation views per clip (logits averaged)
    spatial_views: int = 1

    # A classifier's pooling changes what its weights mean (train.resume); fine-tunes saved before the
    # option existed pooled normalised tokens.
    WEIGHT_MEANING: ClassVar[tuple[str, ...]] = ("pooling",)
    SAVED_DEFAULTS: ClassVar[dict[str, Any]] = SAVED_CLASSIFIER_DEFAULTS

    def validate(self, prefix: str = "finetune") -> None:
        check(bool(self.init_from), f"{prefix}.init_from", "must name an exported MAE (RUN/export)")
        check(0 <= self.drop_path < 1, f"{prefix}.drop_path", "must be in [0, 1)")
        check(0 <= self.head_dropout < 1, f"{prefix}.head_dropout", "must be in [0, 1)")
        check_choice(self.pooling, f"{prefix}.pooling", POOLINGS)
        check(0 < self.layer_decay <= 1, f"{prefix}.layer_decay", "must be in (0, 1]")
        check(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing", "must be in [0, 1)")
        check(self.mixup >= 0, f"{prefix}.mixup", "must be >= 0 (0: off)")
        for split in self.eval_splits:
            check_choice(split, f"{prefix}.eval_splits", SPLITS)
        check(self.temporal_views >= 1, f"{prefix}.temporal_views", "must be >= 1")
        check(self.spatial_views >= 1, f"{prefix}.spatial_views", "must be >= 1")


@dataclass
class FinetuneConfig:
    """Fine-tuning a pretrained encoder with a classifier on labelled clips (`lvmae finetune`)."""

    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    data: DataConfig = field(default_factory=lambda: DataConfig(split="train"))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=100, total_steps=1000)
    )
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/finetune", steps=1000))

    def validate(self) -> None:
        self.finetune.validate("finetune")
        validate_training(self.data, self.optim, self.run)
        check(
            self.data.tokens is None, "data.tokens", "fine-tuning reads clips and labels only: leave it unset"
        )
        check(self.data.split is not None, "data.split", "fine-tune on one split (train), never on all")


def load_finetune_config(
    recipe_paths: Iterable[str | Path | dict[str, Any]] = (), overrides: Sequence[str] = ()
) -> FinetuneConfig:
    """The same for FinetuneConfig."""
    return load_config(FinetuneConfig, recipe_paths, overrides)


def random_window(video: torch.Tensor, frames: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, frames, size, size): one random window and crop for the batch."""
    t, h, w = video.shape[2:]
    t0, y0, x0 = (
        int(torch.randint(n - k + 1, (1,), generator=gen)) for n, k in ((t, frames), (h, size), (w, size))
    )
    return video[:, :, t0 : t0 + frames, y0 : y0 + size, x0 : x0 + size]


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) class ids -> (B, C) label-smoothed one-hot rows."""
    out = torch.full((len(labels), num_classes), smoothing / num_classes)
    return out.scatter_(1, labels[:, None], 1 - smoothing + smoothing / num_classes)


def mixup(
    video: torch.Tensor, targets: torch.Tensor, alpha: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each clip and its soft targets with another clip of the batch, one Beta(alpha, alpha) weight."""
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(video.shape[0], generator=gen).to(video.device)
    return lam * video + (1 - lam) * video[perm], lam * targets + (1 - lam) * targets[perm.cpu()]


class FinetuneTask(Task):
    """A pretrained encoder + mean pooling (finetune.pooling) + linear head, fine-tuned on the labelled clips
    of a split."""

    name = "finetune"
    export_dir = "export"  # under run.out: model.safetensors, classes.json, classifier.json, config.yaml
    labels = True

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        f = cfg.finetune
        self.mae_cfg, self._state, self.source = load_pretrained(f.init_from)
        check_encoder_state(self.mae_cfg, self._state, self.source)
        self.model_cfg = encoder_config(self.mae_cfg, f.num_frames, f.img_size)
        self.model_cfg.encoder.drop_path = f.drop_path
        v = self.model_cfg.video
        self.tokens_per_sample = v.num_tokens
        self.classes: list[str] = []
        self._accuracy = torch.zeros(())

    def check_data(self, clip_spec: dict[str, Any], token_attrs: dict[str, Any] | None, url: str) -> None:
        v = self.model_cfg.video
        if clip_spec["num_frames"] < v.num_frames or clip_spec["size"] < v.img_size:
            raise ConfigError(
                f"finetune.num_frames / img_size: the encoder runs on {v.num_frames} frames of {v.img_size} "
                f"px, but the clips in {url} are {clip_spec['num_frames']} frames of {clip_spec['size']} px"
            )

    def set_classes(self, classes: list[str], counts: dict[str, dict[str, int]] | None = None) -> None:
        """The data set's class map; counts (split -> class -> clips) are checked: every class scored in
        finetune.eval_splits must have clips in the training split."""
        if len(classes) < 2:
            raise ConfigError(f"data.url: fine-tuning needs at least 2 classes, the data set has {classes}")
        train = (counts or {}).get(self.cfg.data.split or "train", {})
        for split in self.cfg.finetune.eval_splits:
            unknown = sorted(
                c for c, n in (counts or {}).get(split, {}).items() if n and c and not train.get(c)
            )
            if unknown:
                raise ConfigError(
                    f"finetune.eval_splits: classes {', '.join(unknown)} have {split} clips but none in "
                    f"data.split={self.cfg.data.split}: the classifier cannot learn them"
                )
        self.classes = list(classes)

    def build_model(self) -> nn.Module:
        f = self.cfg.finetune
        encoder = encoder_for(self.mae_cfg, None, f.num_frames, f.img_size, drop_path=f.drop_path)
        return VideoClassifier(encoder, len(self.classes), f.head_dropout, pooling=f.pooling)

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """The pretrained encoder's weights (head and fc_norm keep their fresh init; with pooling
        `videomae` the pretrained final norm is dropped, as VideoMAE's fine-tuning does); None: random
        init."""
        if self.cfg.finetune.random_init:
            return None
        model = self.build_model()
        state = model.state_dict()
        state.update({k: v for k, v in self._state.items() if k.startswith("encoder.") and k in state})
        return state

    def lr_scale(self, name: str) -> float:
        depth = int(self.model_cfg.encoder.depth)  # type: ignore[arg-type]
        return self.cfg.finetune.layer_decay ** (depth + 1 - layer_id(name, depth))

    def loss(
        self, model: nn.Module, batch: Batch, video: torch.Tensor, gen: torch.Generator, step: int
    ) -> torch.Tensor:
        f, v = self.cfg.finetune, self.model_cfg.video
        video = random_window(video, v.num_frames, v.img_size, gen)
        labels = batch["labels"]
        targets = soft_targets(labels, len(self.classes), f.label_smoothing)
        if f.mixup > 0:
            video, targets = mixup(video, targets, f.mixup, gen)
        logits = model(video)
        self._accuracy = (logits.detach().argmax(1).cpu() == labels).float().mean()
        return F.cross_entropy(logits.float(), targets.to(logits.device))

    def step_metrics(self) -> dict[str, float]:
        return {"accuracy": float(self._accuracy)}

    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        return save_classifier(
            state, self.model_cfg, self.classes, out / self.export_dir, pooling=self.cfg.finetune.pooling
        )
