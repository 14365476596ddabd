"""Typed configuration for the model library (OmegaConf structured schemas).

Every dataclass here is an OmegaConf structured schema: recipes are YAML files merged onto it and the
command line adds dotted overrides (`model.encoder.depth=6`). Unknown keys and wrong types are refused by
OmegaConf while merging; value rules (ranges, divisibility, choices) are checked by `validate(prefix)`,
which names the offending key in a `ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ENCODER_MASKINGS = ("tube", "random", "frame")
DECODER_MASKINGS = ("all", "random", "running_cell", "adaptive")
TARGETS = ("pixels", "tokens")
TOKEN_LOSSES = ("softmax", "factorized")
QUANTIZERS = ("fsq", "lfq")
TOPK_METHODS = ("perturbed", "sigmoid")
TEMPORAL_PADDINGS = ("replicate", "zeros")
NORMS = ("group", "channel")
DECODER_CONTEXTS = ("none", "temporal_mean", "keyframe", "hold")
SCORER_INPUTS = ("frames", "frames_and_differences")
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


class ConfigError(ValueError):
    """A configuration the user wrote is invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _choice(value: str, key: str, choices: Sequence[str]) -> None:
    _check(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


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
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", "must be a positive integer")
        _check(
            self.num_frames % self.tubelet_size == 0,
            f"{prefix}.num_frames",
            f"{self.num_frames} is not divisible by tubelet_size {self.tubelet_size}",
        )
        _check(
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
            _check(
                value is not None and value >= 1,
                f"{prefix}.{name}",
                f"must be a positive integer; got {value}",
            )
        _check(
            self.embed_dim % self.num_heads == 0,  # type: ignore[operator]
            f"{prefix}.embed_dim",
            f"{self.embed_dim} is not divisible by num_heads {self.num_heads}",
        )
        _check(self.mlp_ratio > 0, f"{prefix}.mlp_ratio", "must be positive")
        _check(0.0 <= self.drop_path < 1.0, f"{prefix}.drop_path", "must be in [0, 1)")


@dataclass
class DecoderConfig(EncoderConfig):
    """ViT decoder (narrower and shallower than the encoder, as in VideoMAE)."""


@dataclass
class MaskingConfig:
    """Encoder masking (what the encoder sees) and decoder masking (what the decoder rebuilds)."""

    encoder: str = "tube"
    encoder_ratio: float = 0.9
    decoder: str = "adaptive"
    # Fraction of ALL tokens the decoder reconstructs (ignored by `all`, which takes every masked token).
    decoder_budget: float = 0.15
    running_cell_size: int = 2

    def validate(self, prefix: str = "masking") -> None:
        _choice(self.encoder, f"{prefix}.encoder", ENCODER_MASKINGS)
        _choice(self.decoder, f"{prefix}.decoder", DECODER_MASKINGS)
        _check(0.0 < self.encoder_ratio < 1.0, f"{prefix}.encoder_ratio", "must be in (0, 1)")
        _check(0.0 < self.decoder_budget <= 1.0, f"{prefix}.decoder_budget", "must be in (0, 1]")
        _check(self.running_cell_size >= 2, f"{prefix}.running_cell_size", "must be at least 2")


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
        _choice(self.kind, f"{prefix}.kind", TARGETS)
        _choice(self.token_loss, f"{prefix}.token_loss", TOKEN_LOSSES)
        _check(
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

    def resolved(self) -> MAEConfig:
        """A copy with every size the preset decides filled in (explicit values win)."""
        from lvmae.presets import apply_preset

        return apply_preset(self)

    def validate(self, prefix: str = "model") -> None:
        from lvmae.presets import MODEL_PRESETS

        _choice(self.preset, f"{prefix}.preset", tuple(MODEL_PRESETS))
        _choice(self.pos_embed, f"{prefix}.pos_embed", POS_EMBEDS)
        _choice(self.input_norm, f"{prefix}.input_norm", INPUT_NORMS)
        _check(
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
        _check(
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


def num_visible(grid: tuple[int, int, int], kind: str, ratio: float) -> int:
    """Tokens the encoder sees for a grid (T', H', W'), masking kind and ratio (exact, as masking uses)."""
    t, h, w = grid
    if kind == "tube":
        return t * (h * w - round(ratio * h * w))
    if kind == "frame":
        return (t - round(ratio * t)) * h * w
    return t * h * w - round(ratio * t * h * w)


@dataclass
class TokenizerConfig:
    """FSQ-MagViT tokenizer with a token scorer (see lvmae.tokenizer)."""

    video: VideoSpec = field(default_factory=VideoSpec)
    base_channels: int = 64
    # One entry per resolution level; the encoder halves H and W between levels, so it needs
    # log2(patch_size) + 1 entries, and halves T on the first log2(tubelet_size) of those steps.
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 1
    num_groups: int = 8
    # `group`: GroupNorm (MAGVIT), statistics over the whole clip per group of channels; `channel`: each
    # position's channels alone. Without residual blocks, GroupNorm's last layers erase what is constant
    # over the clip (its colour): small tokenizers with num_res_blocks=0 learn much faster with `channel`.
    norm: str = "group"
    # A linear path beside the convs: a tubelet-sized patchify conv adds to the encoder's latent, and its
    # transpose to the decoder's output. The tokenizer then learns a linear code at once (a tiny one on a
    # CPU otherwise spends its first thousand steps below the clip's mean colour) and the convs refine it.
    patch_skip: bool = False
    quantizer: str = "fsq"
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    lfq_bits: int = 12
    lfq_entropy_weight: float = 0.1
    scorer_channels: int = 32
    # What the scorer's first conv sees: the frames, or the frames and each frame's difference from the
    # one before (motion is then one conv away, as in temporal-difference video networks; which changes
    # matter is still learned from the reconstruction).
    scorer_input: str = "frames_and_differences"
    # Time padding of every 3D conv: `replicate` (the edge frames repeated) or `zeros`; with causal=True
    # all padding in time goes before the clip (MAGVIT-v2's causal convs): no output sees later frames.
    temporal_padding: str = "replicate"
    causal: bool = False
    # Token selection while training: the decoder sees the top keep_ratio of tokens by score (the rest
    # become a learned mask token), through a differentiable top-k: `perturbed` (Berthet et al. 2020:
    # Gaussian noise of topk_sigma row standard deviations, topk_samples draws) or `sigmoid`
    # (straight-through, topk_temperature).
    keep_ratio: float = 0.25
    topk: str = "perturbed"
    topk_sigma: float = 1.0
    topk_samples: int = 128
    topk_temperature: float = 0.05
    # keep_ratio falls linearly from 1 (every token kept: the autoencoder learns first) to its value over
    # the first keep_warmup_steps training steps.
    keep_warmup_steps: int = 0
    # While training, a random context_ratio of the tokens reaches the decoder on top of the selected
    # ones, as the visible tokens reach the MAE decoder: the scorer then learns which tokens cannot be
    # rebuilt from such context, not merely which ones cover most pixels. Evaluation, `decode_codes` and
    # the token store use the selected tokens alone. 0.25 measured best (docs/tokenizer.md).
    context_ratio: float = 0.25
    # `temporal_mean`: the decoder also gets, at every time step, the mean of the kept latents at the same
    # spatial position, so static content kept once reaches every frame. `keyframe`: the first time step's
    # tokens are always kept and reach every time step beside each token: what has not changed since then
    # needs no token of its own. `hold`: the first time step is always kept, and beside each token the
    # decoder gets the latest kept latent at the same position (a video codec's held block): what has not
    # changed since the last kept token needs no token of its own.
    decoder_context: str = "hold"

    @property
    def latent_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.lfq_bits

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else 2**self.lfq_bits

    def validate(self, prefix: str = "tokenizer") -> None:
        self.video.validate(f"{prefix}.video")
        _check(_is_pow2(self.video.patch_size), f"{prefix}.video.patch_size", "must be a power of two")
        _check(_is_pow2(self.video.tubelet_size), f"{prefix}.video.tubelet_size", "must be a power of two")
        _check(
            self.video.tubelet_size <= self.video.patch_size,
            f"{prefix}.video.tubelet_size",
            "must not exceed patch_size",
        )
        levels = int(math.log2(self.video.patch_size)) + 1
        _check(
            len(self.channel_mult) == levels,
            f"{prefix}.channel_mult",
            f"needs {levels} entries (log2(patch_size {self.video.patch_size}) + 1); got {len(self.channel_mult)}",
        )
        _check(all(m >= 1 for m in self.channel_mult), f"{prefix}.channel_mult", "entries must be >= 1")
        _check(self.base_channels >= 1, f"{prefix}.base_channels", "must be positive")
        _check(self.num_groups >= 1, f"{prefix}.num_groups", "must be positive")
        for m in self.channel_mult:
            _check(
                (self.base_channels * m) % self.num_groups == 0,
                f"{prefix}.num_groups",
                f"{self.num_groups} does not divide channel count {self.base_channels * m}",
            )
        _check(self.num_res_blocks >= 0, f"{prefix}.num_res_blocks", "must be >= 0")
        _choice(self.norm, f"{prefix}.norm", NORMS)
        _check(
            not (self.causal and self.norm == "group"),
            f"{prefix}.norm",
            "causal: true needs norm: channel (GroupNorm's statistics span the whole clip, later frames too)",
        )
        _choice(self.quantizer, f"{prefix}.quantizer", QUANTIZERS)
        _check(
            len(self.fsq_levels) >= 1 and all(lv >= 2 for lv in self.fsq_levels),
            f"{prefix}.fsq_levels",
            f"needs at least one level, each >= 2; got {list(self.fsq_levels)}",
        )
        _check(1 <= self.lfq_bits <= 30, f"{prefix}.lfq_bits", "must be in [1, 30]")
        _check(self.scorer_channels >= 1, f"{prefix}.scorer_channels", "must be positive")
        _choice(self.scorer_input, f"{prefix}.scorer_input", SCORER_INPUTS)
        _choice(self.temporal_padding, f"{prefix}.temporal_padding", TEMPORAL_PADDINGS)
        _check(0.0 < self.keep_ratio <= 1.0, f"{prefix}.keep_ratio", "must be in (0, 1]")
        _choice(self.topk, f"{prefix}.topk", TOPK_METHODS)
        _check(self.topk_sigma > 0, f"{prefix}.topk_sigma", "must be positive")
        _check(self.topk_samples >= 1, f"{prefix}.topk_samples", "must be a positive integer")
        _check(self.topk_temperature > 0, f"{prefix}.topk_temperature", "must be positive")
        _check(self.keep_warmup_steps >= 0, f"{prefix}.keep_warmup_steps", "must be >= 0")
        _check(0.0 <= self.context_ratio < 1.0, f"{prefix}.context_ratio", "must be in [0, 1)")
        _choice(self.decoder_context, f"{prefix}.decoder_context", DECODER_CONTEXTS)

    def keep_ratio_at(self, step: int | None) -> float:
        """The training keep ratio at optimizer step `step` (None: the final one)."""
        if step is None or step >= self.keep_warmup_steps:
            return self.keep_ratio
        return 1.0 - (1.0 - self.keep_ratio) * step / self.keep_warmup_steps


def check_tokenizer_matches(model: MAEConfig, tokenizer: TokenizerConfig) -> None:
    """The tokenizer's latent grid must equal the MAE token grid, and its codebook the target's."""
    m, t = model.video, tokenizer.video
    _check(
        (m.tubelet_size, m.patch_size) == (t.tubelet_size, t.patch_size),
        "model.video",
        f"tubelet {m.tubelet_size}x{m.patch_size}x{m.patch_size} differs from the tokenizer's "
        f"{t.tubelet_size}x{t.patch_size}x{t.patch_size}: its latent grid would not match the MAE token grid",
    )
    if model.target.kind == "tokens":
        _check(
            tokenizer.quantizer == "fsq" and list(model.target.fsq_levels) == list(tokenizer.fsq_levels),
            "model.target.fsq_levels",
            f"{list(model.target.fsq_levels)} differs from the tokenizer's "
            f"{list(tokenizer.fsq_levels) if tokenizer.quantizer == 'fsq' else 'LFQ codes'}",
        )


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
