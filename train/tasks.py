"""What the trainer trains: a model, its loss on a batch, its checks on the data, and its export.

`MAETask` pretrains LVMAE / VideoMAE (`lvmae train mae`); `TokenizerTask` fits the FSQ-MagViT tokenizer
and its token scorer (`lvmae train tokenizer`). The trainer (train.trainer) knows nothing else of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvmae.config import ConfigError
from lvmae.losses import mae_loss
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.tokenizer import Tokenizer, save_tokenizer, tokenizer_loss
from lvmae.weights import save_mae
from train.config import TokenizerTrainConfig, TrainConfig

Batch = dict[str, Any]


def _check_clips(spec: dict[str, Any], num_frames: int, img_size: int, key: str, url: str) -> None:
    """The data set's clips must have the model's frame count and size."""
    if (spec["num_frames"], spec["size"]) != (num_frames, img_size):
        raise ConfigError(
            f"{key}: the model takes {num_frames} frames of {img_size} px, but the clips in {url} are "
            f"{spec['num_frames']} frames of {spec['size']} px: set {key} to match, or ingest again"
        )


class MAETask:
    """Masked video autoencoder pretraining: pixel or token targets, any decoder masking."""

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


Task = MAETask | TokenizerTask
