"""What the trainer trains: a model, its loss on a batch, its checks on the data, and its export.

`MAETask` pretrains LVMAE / VideoMAE (`lvmae train mae`); `TokenizerTask` fits the FSQ-MagViT tokenizer
and its token scorer (`lvmae train tokenizer`); `FinetuneTask` fine-tunes a pretrained encoder with a
classifier on labelled clips (`lvmae finetune`). The trainer (train.trainer) knows nothing else of them.
Optional hooks the trainer calls when a task has them: `labels` (the loader adds class ids),
`initial_state()` (weights loaded after the model is built), `lr_scale(name)` (per-parameter lr factor),
`step_metrics()` (figures of the last step, averaged over ranks, logged and exported).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lvmae.config import ConfigError, MAEConfig
from lvmae.heads import (
    ENCODER_PREFIX,
    VideoClassifier,
    check_encoder_state,
    encoder_config,
    encoder_for,
    layer_id,
)
from lvmae.losses import mae_loss
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.tokenizer import Tokenizer, save_tokenizer, tokenizer_loss
from lvmae.weights import save_classifier, save_mae
from train.config import FinetuneConfig, TokenizerTrainConfig, TrainConfig

Batch = dict[str, Any]


def _check_clips(spec: dict[str, Any], num_frames: int, img_size: int, key: str, url: str) -> None:
    """The data set's clips must have the model's frame count and size."""
    if (spec["num_frames"], spec["size"]) != (num_frames, img_size):
        raise ConfigError(
            f"{key}: the model takes {num_frames} frames of {img_size} px, but the clips in {url} are "
            f"{spec['num_frames']} frames of {spec['size']} px: set {key} to match, or ingest again"
        )


# What a pretrained MAE and a run it starts must agree on (model.init_from): the encoder's tensor shapes
# and what its weights mean. The clip length and size may differ: positions are recomputed for the grid.
INIT_KEYS = (
    "video.in_chans",
    "video.tubelet_size",
    "video.patch_size",
    "encoder.embed_dim",
    "encoder.depth",
    "encoder.num_heads",
    "encoder.mlp_ratio",
    "encoder.qkv_bias",
    "pos_embed",
    "input_norm",
)


def init_mismatches(source: MAEConfig, run: MAEConfig) -> list[str]:
    """The INIT_KEYS on which a run's model config (resolved) differs from its init_from's, as
    "model.KEY RUN (the source's: SOURCE)"; empty when the source's encoder can start the run."""
    out = []
    for key in INIT_KEYS:
        mine, theirs = (functools.reduce(getattr, key.split("."), c) for c in (run, source))
        if mine != theirs:
            out.append(f"model.{key} {mine!r} (the source's: {theirs!r})")
    return out


def first_misfit(
    state: dict[str, torch.Tensor], source: dict[str, torch.Tensor], keys: list[str]
) -> str | None:
    """The first of `keys` that `source` lacks or holds in another shape than `state`, said; None if all fit."""
    for k in keys:
        if k not in source:
            return f"no {k}"
        if source[k].shape != state[k].shape:
            return f"{k} {tuple(source[k].shape)}, this run's {tuple(state[k].shape)}"
    return None


class MAETask:
    """Masked video autoencoder pretraining: pixel or token targets, any decoder masking; from a random
    init or, with model.init_from, from an exported MAE's weights."""

    name = "mae"
    export_dir = "export"  # under run.out: model.safetensors + config.yaml (lvmae.weights.load_mae)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model_cfg = cfg.model_config()
        tgt, masking = self.model_cfg.target, self.model_cfg.masking
        self.needs_codes = tgt.kind == "tokens"
        self.needs_priority = masking.decoder == "adaptive"
        self.tokens = cfg.data.tokens if (self.needs_codes or self.needs_priority) else None
        self.tokens_per_sample = self.model_cfg.video.num_tokens
        self.init_from = getattr(cfg.model, "init_from", None)
        self._init_state: dict[str, torch.Tensor] | None = None
        if self.init_from:
            self._init_state, self._init_source = self._load_init(self.init_from)

    def _load_init(self, source: str) -> tuple[dict[str, torch.Tensor], str]:
        """The MAE state dict of model.init_from, checked against this run (one ConfigError naming what
        differs, or UserError when it is not an export, run or checkpoint folder)."""
        from train.probe import load_source

        src_cfg, state, what = load_source(source)
        diffs = init_mismatches(src_cfg, self.model_cfg)
        if diffs:
            raise ConfigError(f"model.init_from: {what} cannot start this run: {'; '.join(diffs)}")
        check_encoder_state(self.model_cfg, state, f"model.init_from: {what}")
        return state, what

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """model.init_from's encoder, and its decoder (decoder_embed, mask_token, decoder, head) when it has
        every one of those tensors in this run's shapes; else the decoder keeps the fresh init this run's
        seed gives. None without init_from (the model keeps its own init). Positions are not weights: the
        model's tables are those of this run's grid."""
        if self._init_state is None:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed)
            state = MaskedVideoAutoencoder(self.model_cfg).state_dict()
        src = self._init_state
        state.update({k: src[k] for k in state if k.startswith(ENCODER_PREFIX)})
        rest = [k for k in state if not k.startswith(ENCODER_PREFIX)]
        misfit = first_misfit(state, src, rest)
        if misfit is None:
            state.update({k: src[k] for k in rest})
            said = "encoder and decoder"
        else:
            said = f"encoder; the decoder keeps its fresh init ({misfit})"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"model.init_from: {said} from {self._init_source}", flush=True)
        return state

    def check_data(self, clip_spec: dict[str, Any], token_attrs: dict[str, Any] | None, url: str) -> None:
        v = self.model_cfg.video
        _check_clips(clip_spec, v.num_frames, v.img_size, "model.video", url)
        if token_attrs is None:
            return
        if list(token_attrs["grid"]) != list(v.grid):
            raise ConfigError(
                f"data.tokens: the token set's grid {tuple(token_attrs['grid'])} is not the model's token grid "
                f"{v.grid}: the tokenizer and model.video must use the same tubelet"
            )
        if self.needs_codes and token_attrs.get("fsq_levels") != list(self.model_cfg.target.fsq_levels):
            raise ConfigError(
                f"model.target.fsq_levels: {list(self.model_cfg.target.fsq_levels)} differs from the token "
                f"set's {token_attrs.get('fsq_levels') or token_attrs.get('quantizer')}"
            )

    def build_model(self) -> nn.Module:
        return MaskedVideoAutoencoder(self.model_cfg)

    def loss(
        self, model: nn.Module, batch: Batch, video: torch.Tensor, gen: torch.Generator, step: int
    ) -> torch.Tensor:
        """model: the DeepSpeed engine (or the bare module); video: the batch's clips on the device;
        gen: this step's generator (masks); step: the optimizer step being taken (0-based)."""
        module = getattr(model, "module", model)
        priority = batch.get("priority") if self.needs_priority else None
        plan = module.plan(video.shape[0], gen, priority, video.device)
        out = model(video, plan=plan)
        return mae_loss(self.model_cfg, out, video=video, codes=batch.get("codes"))

    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        return save_mae(state, self.model_cfg, out / self.export_dir)


class TokenizerTask:
    """FSQ-MagViT tokenizer + token scorer: reconstruction from the kept tokens weighted by their scores."""

    name = "tokenizer"
    export_dir = "tokenizer"  # under run.out: what `lvmae ingest tokens --tokenizer` reads
    tokens = None

    def __init__(self, cfg: TokenizerTrainConfig):
        self.cfg = cfg
        self.tokens_per_sample = cfg.tokenizer.video.num_tokens

    def check_data(self, clip_spec: dict[str, Any], token_attrs: dict[str, Any] | None, url: str) -> None:
        v = self.cfg.tokenizer.video
        _check_clips(clip_spec, v.num_frames, v.img_size, "tokenizer.video", url)

    def build_model(self) -> nn.Module:
        return Tokenizer(self.cfg.tokenizer)

    def loss(
        self, model: nn.Module, batch: Batch, video: torch.Tensor, gen: torch.Generator, step: int
    ) -> torch.Tensor:
        """gen draws the top-k noise and context tokens; step sets the keep-ratio warm-up."""
        keep = self.cfg.tokenizer.keep_ratio_at(step)
        return tokenizer_loss(model(video, generator=gen, keep_ratio=keep), video)[0]

    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        model = Tokenizer(self.cfg.tokenizer)
        model.load_state_dict(state, strict=True)
        save_tokenizer(model, out / self.export_dir)
        return out / self.export_dir


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


class FinetuneTask:
    """A pretrained encoder + mean pooling (finetune.pooling) + linear head, fine-tuned on the labelled clips
    of a split."""

    name = "finetune"
    export_dir = "export"  # under run.out: model.safetensors, classes.json, classifier.json, config.yaml
    tokens = None
    labels = True

    def __init__(self, cfg: FinetuneConfig):
        from train.probe import load_source

        self.cfg = cfg
        f = cfg.finetune
        self.mae_cfg, self._state, self.source = load_source(f.init_from)
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


Task = MAETask | TokenizerTask | FinetuneTask
