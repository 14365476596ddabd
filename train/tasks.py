"""What the trainer trains: the Task protocol, and the two pretraining tasks.

A task is a model, its loss on a batch, its checks on the data, and its export; the trainer
(train.trainer) calls exactly the methods of `Task` and knows nothing else of it. `MAETask` pretrains
LVMAE / VideoMAE (`lvmae train mae`); `TokenizerTask` fits the FSQ-MagViT tokenizer and its token scorer
(`lvmae train tokenizer`); evals.finetune.FinetuneTask fine-tunes a pretrained encoder with a classifier
(`lvmae finetune`). A new task subclasses Task (which gives the defaults of its optional parts) and is
named in the commands' table of tasks (lvmae_cli.train_cmd.TASKS).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from lvmae.config import ConfigError, MAEConfig
from lvmae.heads import ENCODER_PREFIX, check_encoder_state
from lvmae.losses import mae_loss
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.priority import token_priority
from lvmae.tokenizer import Tokenizer, save_tokenizer, tokenizer_loss
from lvmae.weights import save_mae
from train.config import TokenizerTrainConfig, TrainConfig
from train.pretrained import load_pretrained

Batch = dict[str, Any]


class Task(Protocol):
    """What the trainer trains. Subclass it: check_data, build_model, loss and export are the task's own
    (here they raise NotImplementedError); the other bodies are the defaults of the optional parts (no
    labels, no token set, no initial weights, one learning rate, no extra metrics)."""

    name: ClassVar[str]  # "mae", "tokenizer", "finetune": in messages and the run's summary
    export_dir: ClassVar[str]  # under run.out, where export() writes the trained weights
    tokens: str | None = None  # the token set the loader joins (codes, priority): data.tokens
    labels: bool = False  # whether the loader adds class ids ("labels" in the batch)
    tokens_per_sample: int  # tokens of one clip, for the throughput metric

    def check_data(self, clip_spec: dict[str, Any], token_attrs: dict[str, Any] | None, url: str) -> None:
        """Raise ConfigError (naming the key to change) unless the data set's clips (index.json's
        clip_spec) and token set (its attributes, or None) fit the model."""
        raise NotImplementedError

    def set_classes(self, classes: list[str], counts: dict[str, dict[str, int]] | None = None) -> None:
        """The data set's class map and its counts per split (split -> class -> clips), for tasks with
        labels; before build_model."""

    def build_model(self) -> nn.Module:
        """The model, under the engine's init context (ZeRO-3 partitions it as it is built)."""
        raise NotImplementedError

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """Whole tensors loaded into the model once it is built (pretrained weights); None: its init."""
        return None

    def lr_scale(self, name: str) -> float:
        """The learning-rate factor of parameter `name` (layer-wise lr decay); 1 for all by default."""
        return 1.0

    def loss(
        self, model: nn.Module, batch: Batch, video: torch.Tensor, gen: torch.Generator, step: int
    ) -> torch.Tensor:
        """model: the DeepSpeed engine (or the bare module); video: the batch's clips on the device, in the
        training dtype; gen: this step's generator (masks, noise); step: the optimizer step being taken."""
        raise NotImplementedError

    def features(self, model: nn.Module, video: torch.Tensor) -> torch.Tensor:
        """One feature vector per clip (B, D) of the model's encoder, for the in-run health probe
        (train.health, eval.*); tasks without an encoder to probe leave it unimplemented."""
        raise NotImplementedError(f"the {self.name} task has no features to probe")

    def step_metrics(self) -> dict[str, float]:
        """Figures of the last step (averaged over ranks, logged and exported), e.g. accuracy."""
        return {}

    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        """Write the trained weights (full tensors, rank 0) under run folder `out`; -> their folder."""
        raise NotImplementedError


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


class MAETask(Task):
    """Masked video autoencoder pretraining: pixel or token targets, any decoder masking; from a random
    init or, with model.init_from, from an exported MAE's weights."""

    name = "mae"
    export_dir = "export"  # under run.out: model.safetensors + config.yaml (lvmae.weights.load_mae)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model_cfg = cfg.model_config()
        tgt, masking = self.model_cfg.target, self.model_cfg.masking
        self.needs_codes = tgt.kind == "tokens"
        self.tokens = cfg.data.tokens if (self.needs_codes or masking.needs_token_priority) else None
        self.tokens_per_sample = self.model_cfg.video.num_tokens
        self.init_from = cfg.model.init_from
        self._init_state: dict[str, torch.Tensor] | None = None
        if self.init_from:
            self._init_state, self._init_source = self._load_init(self.init_from)

    def _load_init(self, source: str) -> tuple[dict[str, torch.Tensor], str]:
        """The MAE state dict of model.init_from, checked against this run (one ConfigError naming what
        differs, or UserError when it is not an export, run or checkpoint folder)."""
        src_cfg, state, what = load_pretrained(source)
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
        """gen draws the masks."""
        module = getattr(model, "module", model)
        priority, m, v = None, self.model_cfg.masking, self.model_cfg.video
        if m.needs_priority:
            priority = token_priority(m.priority, batch.get("priority"), video, v.tubelet_size, v.patch_size)
        plan = module.plan(video.shape[0], gen, priority, video.device)
        out = model(video, plan=plan)
        return mae_loss(self.model_cfg, out, video=video, codes=batch.get("codes"))

    def features(self, model: nn.Module, video: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens of the whole clip (no masking), mean-pooled. Through the engine's forward
        (model(video, encode=True)): a submodule called on its own would bypass what DeepSpeed's ZeRO-3
        does around a forward, and leave parameters released that the next training step uses."""
        return model(video, encode=True).mean(1)

    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        return save_mae(state, self.model_cfg, out / self.export_dir)


class TokenizerTask(Task):
    """FSQ-MagViT tokenizer + token scorer: reconstruction from the kept tokens weighted by their scores."""

    name = "tokenizer"
    export_dir = "tokenizer"  # under run.out: what `lvmae ingest tokens --tokenizer` reads

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
