"""Typed configuration for the model library (OmegaConf structured schemas).

Every dataclass here is an OmegaConf structured schema: recipes are YAML files merged onto it and the
command line adds dotted overrides (`model.encoder.depth=6`). Unknown keys and wrong types are refused by
OmegaConf while merging; value rules (ranges, divisibility, choices) are checked by `validate(prefix)`,
which names the offending key in a `ConfigError`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TARGETS = ("pixels", "tokens")
TOKEN_LOSSES = ("softmax", "factorized")
POS_EMBEDS = ("videomae_1d", "sincos_3d")
INPUT_NORMS = ("none", "imagenet")
# VideoMAE's input normalization (ImageNet statistics of RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Model options added after configs were first saved, with the value every model saved without them was
# trained with: a saved config that lacks one means that value, never the schema's newer default.
SAVED_MODEL_DEFAULTS: dict[str, Any] = {"pos_embed": "sincos_3d", "input_norm": "none"}
# How a fine-tuned classifier pools the encoder's tokens (lvmae.heads.VideoClassifier): `videomae` (mean of
# the last block's tokens, VideoMAE's fine-tuning head) or `norm_mean` (the encoder's final norm on every
# token, then the mean). The same rule for classifier options: a classifier saved without one was trained
# with the value here.
POOLINGS = ("videomae", "norm_mean")
SAVED_CLASSIFIER_DEFAULTS: dict[str, Any] = {"pooling": "norm_mean"}
# Named model sizes, in one table (lvmae.presets builds configs from it). Encoder sizes are VideoMAE's
# (ViT-S/B/L/H); decoders are 4 blocks, narrower than the encoder, as in VideoMAE. `tiny` trains on a
# laptop CPU in seconds and is what tests and the demo use.
# name: (encoder embed_dim, depth, heads), (decoder embed_dim, depth, heads)
MODEL_PRESETS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "tiny": ((96, 4, 3), (64, 2, 2)),
    "small": ((384, 12, 6), (192, 4, 3)),
    "base": ((768, 12, 12), (384, 4, 6)),
    "large": ((1024, 24, 16), (512, 4, 8)),
    "huge": ((1280, 32, 16), (640, 4, 8)),
}


class ConfigError(ValueError):
    """A configuration the user wrote is invalid; the message names the key."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError("KEY: MSG") unless cond: every config section's value rules go through it."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_choice(value: Any, key: str, choices: Sequence[Any]) -> None:
    check(value in choices, key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass
class VideoSpec:
    """Clip geometry and the tubelet that cuts it into tokens."""

    num_frames: int = 16
    img_size: int = 224
    in_chans: int = 3
    tubelet_size: int = 2  # frames per token (t)
    patch_size: int = 16  # pixels per token side (p)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        return (
            self.num_frames // self.tubelet_size,
            self.img_size // self.patch_size,
            self.img_size // self.patch_size,
        )

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def tubelet_dim(self) -> int:
        """Values in one tubelet: t * p * p * C."""
        return self.tubelet_size * self.patch_size * self.patch_size * self.in_chans

    def validate(self, prefix: str = "video") -> None:
        for name in ("num_frames", "img_size", "in_chans", "tubelet_size", "patch_size"):
            check(getattr(self, name) >= 1, f"{prefix}.{name}", "must be a positive integer")
        check(
            self.num_frames % self.tubelet_size == 0,
            f"{prefix}.num_frames",
            f"{self.num_frames} is not divisible by tubelet_size {self.tubelet_size}",
        )
        check(
            self.img_size % self.patch_size == 0,
            f"{prefix}.img_size",
            f"{self.img_size} is not divisible by patch_size {self.patch_size}",
        )


@dataclass
class EncoderConfig:
    """ViT encoder. Fields left at None come from the model preset."""

    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    grad_checkpointing: bool = False

    def validate(self, prefix: str) -> None:
        for name in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            check(
                value is not None and value >= 1,
                f"{prefix}.{name}",
                f"must be a positive integer; got {value}",
            )
        check(
            self.embed_dim % self.num_heads == 0,  # type: ignore[operator]
            f"{prefix}.embed_dim",
            f"{self.embed_dim} is not divisible by num_heads {self.num_heads}",
        )
        check(self.mlp_ratio > 0, f"{prefix}.mlp_ratio", "must be positive")
        check(0.0 <= self.drop_path < 1.0, f"{prefix}.drop_path", "must be in [0, 1)")


@dataclass
class DecoderConfig(EncoderConfig):
    """ViT decoder (narrower and shallower than the encoder, as in VideoMAE)."""


@dataclass
class MaskingConfig:
    """Encoder masking (what the encoder sees) and decoder masking (what the decoder rebuilds).

    The kinds are the tables of lvmae.masking (ENCODER_MASKINGS, DECODER_MASKINGS): a new strategy is one
    entry there. They are looked up when needed, so importing this schema does not import torch.
    """

    encoder: str = "tube"
    encoder_ratio: float = 0.9
    decoder: str = "adaptive"
    # Fraction of ALL tokens the decoder reconstructs (ignored by `all`, which takes every masked token).
    decoder_budget: float = 0.15
    running_cell_size: int = 2
    # What `adaptive` ranks tokens by (lvmae.priority.PRIORITY_SOURCES): the tokenizer's learned score
    # (LVMAE), the frame difference, or both combined by rank.
    priority: str = "learned"

    @property
    def needs_priority(self) -> bool:
        """Whether the decoder masking ranks tokens by a per-token priority."""
        from lvmae.masking import DECODER_MASKINGS

        return DECODER_MASKINGS[self.decoder].needs_priority

    @property
    def needs_token_priority(self) -> bool:
        """Whether that priority reads the tokenizer's scores (then a run needs a token set: data.tokens)."""
        from lvmae.priority import PRIORITY_SOURCES

        return self.needs_priority and PRIORITY_SOURCES[self.priority].needs_tokens

    def validate(self, prefix: str = "masking") -> None:
        from lvmae.masking import DECODER_MASKINGS, ENCODER_MASKINGS
        from lvmae.priority import PRIORITY_SOURCES

        check_choice(self.encoder, f"{prefix}.encoder", tuple(ENCODER_MASKINGS))
        check_choice(self.decoder, f"{prefix}.decoder", tuple(DECODER_MASKINGS))
        check_choice(self.priority, f"{prefix}.priority", tuple(PRIORITY_SOURCES))
        check(0.0 < self.encoder_ratio < 1.0, f"{prefix}.encoder_ratio", "must be in (0, 1)")
        check(0.0 < self.decoder_budget <= 1.0, f"{prefix}.decoder_budget", "must be in (0, 1]")
        check(self.running_cell_size >= 2, f"{prefix}.running_cell_size", "must be at least 2")


@dataclass
class TargetConfig:
    """What the decoder predicts: normalized pixels (VideoMAE) or tokenizer codes (LVMAE)."""

    kind: str = "pixels"
    norm_pix: bool = True
    token_loss: str = "factorized"
    # The tokenizer's FSQ levels; the codebook has prod(levels) entries. Only used for `tokens`.
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    def validate(self, prefix: str = "target") -> None:
        check_choice(self.kind, f"{prefix}.kind", TARGETS)
        check_choice(self.token_loss, f"{prefix}.token_loss", TOKEN_LOSSES)
        check(
            len(self.fsq_levels) >= 1 and all(lv >= 2 for lv in self.fsq_levels),
            f"{prefix}.fsq_levels",
            f"needs at least one level, each >= 2; got {list(self.fsq_levels)}",
        )


@dataclass
class MAEConfig:
    """A masked video autoencoder: preset sizes, clip geometry, masking and targets."""

    preset: str = "base"
    video: VideoSpec = field(default_factory=VideoSpec)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    # Fixed position table of the encoder and decoder: `videomae_1d` (VideoMAE's 1D sine-cosine code of
    # the flattened token index, as Hugging Face transformers' VideoMAE computes it) or `sincos_3d`
    # (separate codes of t, h and w; what models saved before this option were trained with).
    pos_embed: str = "videomae_1d"
    # What the encoder does to its [0, 1] input first: `none`, or `imagenet` ((x - mean) / std per
    # channel, VideoMAE's preprocessing). Pixel targets are always cut from the [0, 1] clip.
    input_norm: str = "none"

    # Options whose value changes what saved weights mean without changing their shapes: a checkpoint
    # resumes only under the values it was trained with (train.resume), a save that predates one of them
    # having been trained with SAVED_DEFAULTS' value.
    WEIGHT_MEANING: ClassVar[tuple[str, ...]] = ("pos_embed", "input_norm")
    SAVED_DEFAULTS: ClassVar[dict[str, Any]] = SAVED_MODEL_DEFAULTS

    def resolved(self) -> MAEConfig:
        """A copy with every size the preset decides (MODEL_PRESETS) filled in: explicit values win."""
        check_choice(self.preset, "model.preset", tuple(MODEL_PRESETS))
        out = copy.deepcopy(self)
        enc, dec = MODEL_PRESETS[self.preset]
        for part, sizes in ((out.encoder, enc), (out.decoder, dec)):
            for name, value in zip(("embed_dim", "depth", "num_heads"), sizes):
                if getattr(part, name) is None:
                    setattr(part, name, value)
        return out

    def validate(self, prefix: str = "model") -> None:
        from lvmae.masking import num_visible

        check_choice(self.preset, f"{prefix}.preset", tuple(MODEL_PRESETS))
        check_choice(self.pos_embed, f"{prefix}.pos_embed", POS_EMBEDS)
        check_choice(self.input_norm, f"{prefix}.input_norm", INPUT_NORMS)
        check(
            self.input_norm == "none" or self.video.in_chans == len(IMAGENET_MEAN),
            f"{prefix}.input_norm",
            f"imagenet needs RGB clips (video.in_chans 3); got in_chans {self.video.in_chans}",
        )
        cfg = self.resolved()
        cfg.video.validate(f"{prefix}.video")
        cfg.encoder.validate(f"{prefix}.encoder")
        cfg.decoder.validate(f"{prefix}.decoder")
        cfg.masking.validate(f"{prefix}.masking")
        cfg.target.validate(f"{prefix}.target")
        n_visible = num_visible(cfg.video.grid, cfg.masking.encoder, cfg.masking.encoder_ratio)
        check(
            0 < n_visible < cfg.video.num_tokens,
            f"{prefix}.masking.encoder_ratio",
            f"{cfg.masking.encoder_ratio} leaves {n_visible} of {cfg.video.num_tokens} tokens visible "
            f"for grid {cfg.video.grid}; the encoder needs at least one visible and one masked token",
        )


def saved_model_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved MAE config (an export's or checkpoint's `model`, as a plain dict) with every option added
    after it was written set to what it was trained with (SAVED_MODEL_DEFAULTS): a copy, before it is
    merged onto the schema. Recipes are not saved configs: they get the schema's defaults."""
    return {**SAVED_MODEL_DEFAULTS, **raw}


def saved_classifier_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved classifier's options (an export's classifier.json, as a plain dict; {} for exports written
    before the file existed) with every option it predates set to what it was trained with
    (SAVED_CLASSIFIER_DEFAULTS): a copy."""
    return {**SAVED_CLASSIFIER_DEFAULTS, **raw}


def load_saved_model_config(path: str | Path) -> MAEConfig:
    """An exported model's config.yaml -> MAEConfig, old configs read as they were trained (see
    saved_model_dict). Raises ConfigError as load_config does."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a model config (a mapping of model options)")
    return load_config(MAEConfig, [saved_model_dict(raw)])  # type: ignore[arg-type]


T = TypeVar("T")


def load_config(
    schema: type[T],
    yamls: Iterable[str | Path | dict[str, Any]] = (),
    overrides: Sequence[str] = (),
) -> T:
    """Merge YAML files (or dicts) and dotted overrides onto `schema`, then validate.

    Raises ConfigError naming the key for unknown keys, wrong types and invalid values.
    """
    merged: DictConfig = OmegaConf.structured(schema)
    try:
        for src in yamls:
            layer = OmegaConf.create(src) if isinstance(src, dict) else OmegaConf.load(src)
            merged = OmegaConf.merge(merged, layer)  # type: ignore[assignment]
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))  # type: ignore[assignment]
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what runs and checkpoints save)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
