"""Typed configuration of the FSQ-MagViT tokenizer and its token scorer (an OmegaConf structured schema,
like lvmae.config's model schema; lvmae.tokenizer builds the model from it).

    cfg = load_config(TokenizerConfig, ["configs/tokenizer_128f.yaml"])   # lvmae.config.load_config
    check_tokenizer_matches(mae_cfg, cfg)   # its latent grid and codebook must be the MAE's
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lvmae.config import MAEConfig, VideoSpec, check, check_choice

QUANTIZERS = ("fsq", "lfq")
TOPK_METHODS = ("perturbed", "sigmoid")
TEMPORAL_PADDINGS = ("replicate", "zeros")
NORMS = ("group", "channel")
DECODER_CONTEXTS = ("none", "temporal_mean", "keyframe", "hold")
SCORER_INPUTS = ("frames", "frames_and_differences")
DROPPED_TOKENS = ("mask_token", "zeros")


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


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
    # The perturbed top-k runs on each clip's logits standardised (mean 0, std 1), so topk_sigma is in
    # units of their spread; false: on the raw logits (the paper's perturbed maximum), sigma absolute.
    standardize_logits: bool = True
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
    # What a dropped token becomes before the decoder: a learned `mask_token`, or `zeros` (the paper's:
    # the latent multiplied by its keep mask).
    dropped_tokens: str = "mask_token"

    @property
    def latent_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.lfq_bits

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else 2**self.lfq_bits

    def validate(self, prefix: str = "tokenizer") -> None:
        self.video.validate(f"{prefix}.video")
        check(_is_pow2(self.video.patch_size), f"{prefix}.video.patch_size", "must be a power of two")
        check(_is_pow2(self.video.tubelet_size), f"{prefix}.video.tubelet_size", "must be a power of two")
        check(
            self.video.tubelet_size <= self.video.patch_size,
            f"{prefix}.video.tubelet_size",
            "must not exceed patch_size",
        )
        levels = int(math.log2(self.video.patch_size)) + 1
        check(
            len(self.channel_mult) == levels,
            f"{prefix}.channel_mult",
            f"needs {levels} entries (log2(patch_size {self.video.patch_size}) + 1); got {len(self.channel_mult)}",
        )
        check(all(m >= 1 for m in self.channel_mult), f"{prefix}.channel_mult", "entries must be >= 1")
        check(self.base_channels >= 1, f"{prefix}.base_channels", "must be positive")
        check(self.num_groups >= 1, f"{prefix}.num_groups", "must be positive")
        for m in self.channel_mult:
            check(
                (self.base_channels * m) % self.num_groups == 0,
                f"{prefix}.num_groups",
                f"{self.num_groups} does not divide channel count {self.base_channels * m}",
            )
        check(self.num_res_blocks >= 0, f"{prefix}.num_res_blocks", "must be >= 0")
        check_choice(self.norm, f"{prefix}.norm", NORMS)
        check(
            not (self.causal and self.norm == "group"),
            f"{prefix}.norm",
            "causal: true needs norm: channel (GroupNorm's statistics span the whole clip, later frames too)",
        )
        check_choice(self.quantizer, f"{prefix}.quantizer", QUANTIZERS)
        check(
            len(self.fsq_levels) >= 1 and all(lv >= 2 for lv in self.fsq_levels),
            f"{prefix}.fsq_levels",
            f"needs at least one level, each >= 2; got {list(self.fsq_levels)}",
        )
        check(1 <= self.lfq_bits <= 30, f"{prefix}.lfq_bits", "must be in [1, 30]")
        check(self.scorer_channels >= 1, f"{prefix}.scorer_channels", "must be positive")
        check_choice(self.scorer_input, f"{prefix}.scorer_input", SCORER_INPUTS)
        check_choice(self.temporal_padding, f"{prefix}.temporal_padding", TEMPORAL_PADDINGS)
        check(0.0 < self.keep_ratio <= 1.0, f"{prefix}.keep_ratio", "must be in (0, 1]")
        check_choice(self.topk, f"{prefix}.topk", TOPK_METHODS)
        check(self.topk_sigma > 0, f"{prefix}.topk_sigma", "must be positive")
        check(self.topk_samples >= 1, f"{prefix}.topk_samples", "must be a positive integer")
        check(self.topk_temperature > 0, f"{prefix}.topk_temperature", "must be positive")
        check(self.keep_warmup_steps >= 0, f"{prefix}.keep_warmup_steps", "must be >= 0")
        check(0.0 <= self.context_ratio < 1.0, f"{prefix}.context_ratio", "must be in [0, 1)")
        check_choice(self.decoder_context, f"{prefix}.decoder_context", DECODER_CONTEXTS)
        check_choice(self.dropped_tokens, f"{prefix}.dropped_tokens", DROPPED_TOKENS)

    def keep_ratio_at(self, step: int | None) -> float:
        """The training keep ratio at optimizer step `step` (None: the final one)."""
        if step is None or step >= self.keep_warmup_steps:
            return self.keep_ratio
        return 1.0 - (1.0 - self.keep_ratio) * step / self.keep_warmup_steps


def check_tokenizer_matches(model: MAEConfig, tokenizer: TokenizerConfig) -> None:
    """The tokenizer's latent grid must equal the MAE token grid, and its codebook the target's."""
    m, t = model.video, tokenizer.video
    check(
        (m.tubelet_size, m.patch_size) == (t.tubelet_size, t.patch_size),
        "model.video",
        f"tubelet {m.tubelet_size}x{m.patch_size}x{m.patch_size} differs from the tokenizer's "
        f"{t.tubelet_size}x{t.patch_size}x{t.patch_size}: its latent grid would not match the MAE token grid",
    )
    if model.target.kind == "tokens":
        check(
            tokenizer.quantizer == "fsq" and list(model.target.fsq_levels) == list(tokenizer.fsq_levels),
            "model.target.fsq_levels",
            f"{list(model.target.fsq_levels)} differs from the tokenizer's "
            f"{list(tokenizer.fsq_levels) if tokenizer.quantizer == 'fsq' else 'LFQ codes'}",
        )
