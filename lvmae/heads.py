"""Downstream heads on the video encoder: the attentive probe (frozen encoder) and the classifier that
fine-tunes it, and the encoder itself rebuilt for another clip length or size.

    encoder = encoder_for(mae_cfg, state, num_frames=32)    # VideoViT, positions recomputed for the grid
    probe = AttentiveProbe(encoder.dim, num_classes=4)      # V-JEPA's probe: query cross-attention + linear
    logits = probe(encoder(video))                          # (B, N, D) tokens -> (B, num_classes)
    model = VideoClassifier(encoder, 4, pooling="videomae")  # VideoMAE fine-tuning: mean pool, norm, linear

The position table (`model.pos_embed`, lvmae.pos_embed.position_table) is a fixed sine-cosine function
of the token grid, so an encoder trained on one grid runs on another with the same weights: a 128-frame
encoder probed on 32 frames and the reverse. With `videomae_1d` the new table is that of the new flattened
token count (as transformers' VideoMAE builds it for its config's num_frames): the first frames' tokens
keep their codes when only the clip length changes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lvmae.config import POOLINGS, ConfigError, MAEConfig
from lvmae.mae import VideoViT, init_like_mae
from lvmae.vit import Mlp, init_weights

ENCODER_PREFIX = "encoder."
# fc_norm's eps per pooling: transformers' VideoMAEForVideoClassification fixes 1e-5 (its LayerNorm default).
FC_NORM_EPS = {"videomae": 1e-5, "norm_mean": 1e-6}


def encoder_config(cfg: MAEConfig, num_frames: int | None = None, img_size: int | None = None) -> MAEConfig:
    """`cfg` (resolved) with the clip length / size changed; the tubelet must still tile the new clip."""
    out = copy.deepcopy(cfg).resolved()
    v = out.video
    old = (v.num_frames, v.img_size)
    v.num_frames = num_frames or v.num_frames
    v.img_size = img_size or v.img_size
    if v.num_frames % v.tubelet_size or v.img_size % v.patch_size:
        raise ConfigError(
            f"the encoder's tubelet ({v.tubelet_size} frames x {v.patch_size} px) does not tile "
            f"{v.num_frames} frames of {v.img_size} px (it was trained on {old[0]} frames of {old[1]} px)"
        )
    return out


def encoder_for(
    cfg: MAEConfig,
    state: dict[str, torch.Tensor] | None,
    num_frames: int | None = None,
    img_size: int | None = None,
    drop_path: float | None = None,
) -> VideoViT:
    """The MAE's encoder on a clip of num_frames x img_size (default: the pretraining clip). state: a
    MaskedVideoAutoencoder state dict (encoder.* keys are taken) or None for a random-init encoder."""
    cfg = encoder_config(cfg, num_frames, img_size)
    if drop_path is not None:
        cfg.encoder.drop_path = drop_path
    encoder = VideoViT(cfg)
    encoder.apply(init_like_mae)
    if state is not None:
        own = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        encoder.load_state_dict(own, strict=True)
    return encoder


def check_encoder_state(cfg: MAEConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise ConfigError (one line) unless the encoder.* tensors of `state` are exactly what the encoder
    of `cfg` holds: a checkpoint of another preset or tubelet is refused before any work starts."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VideoViT(cfg.resolved()).state_dict().items()}
    got = {k[len(ENCODER_PREFIX) :]: tuple(v.shape) for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if got == expected:
        return
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = [f"{k} {got[k]} (the config needs {expected[k]})" for k in sorted(set(got) & set(expected))]
    shapes = [s for s, k in zip(shapes, sorted(set(got) & set(expected))) if got[k] != expected[k]]
    detail = "; ".join(
        part
        for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shape {shapes[0]}" if shapes else "",
        )
        if part
    )
    raise ConfigError(
        f"{where}: its encoder weights do not fit the {cfg.preset} encoder its config describes ({detail})"
    )


class AttentivePooler(nn.Module):
    """Learnable queries cross-attend to the tokens (pre-norm), then a residual MLP: (B, N, D) -> (B, Q, D)."""

    def __init__(self, dim: int, num_heads: int, num_queries: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.apply(init_weights)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        h, hs = self.num_heads, d // self.num_heads
        q = self.q(self.query.expand(b, -1, -1))  # (B, Q, D)
        k, v = self.kv(self.norm_kv(tokens)).reshape(b, n, 2, h, hs).permute(2, 0, 3, 1, 4).unbind(0)
        q = q.reshape(b, -1, h, hs).transpose(1, 2)  # (B, h, Q, hs)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)  # (B, Q, D)
        x = self.query + self.proj(x)
        return x + self.mlp(self.norm_mlp(x))


class AttentiveProbe(nn.Module):
    """A frozen encoder's tokens -> class logits: per-channel standardization, attentive pooling, layer
    norm, linear classifier.

    The standardization uses fixed statistics of the training features (set_feature_stats), like the
    affine-free BatchNorm that MAE puts before its linear probe: an MAE encoder's tokens share a large
    common component (every token's output points almost the same way, the differences are a few percent
    of it), and the pooler's per-token LayerNorm does not remove a component common to all tokens.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4, num_queries: int = 1):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.pool = AttentivePooler(dim, num_heads, num_queries)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """features (..., D): the channels' mean and standard deviation over everything else."""
        flat = features.reshape(-1, features.shape[-1]).float()
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0).clamp(min=1e-6))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D) -> logits (B, num_classes)."""
        tokens = (tokens - self.feature_mean) / self.feature_std
        return self.head(self.norm(self.pool(tokens).mean(1)))


class VideoClassifier(nn.Module):
    """Fine-tuning: the encoder on every token, mean pooling, layer norm (VideoMAE's fc_norm), linear.

    pooling (lvmae.config.POOLINGS): `videomae` is VideoMAE's fine-tuning head, transformers'
    VideoMAEForVideoClassification with use_mean_pooling: the encoder's final norm is removed (its module
    becomes an identity, so the mean is over the last block's tokens) and fc_norm has eps 1e-5, as there.
    `norm_mean` keeps the final norm on every token before the mean, and fc_norm eps 1e-6: what classifiers
    saved before the option were trained with (lvmae.config.SAVED_CLASSIFIER_DEFAULTS), and the default here
    for that reason; `lvmae finetune` builds `videomae` ones unless told otherwise (finetune.pooling).
    """

    def __init__(
        self, encoder: VideoViT, num_classes: int, head_dropout: float = 0.0, pooling: str = "norm_mean"
    ):
        super().__init__()
        if pooling not in FC_NORM_EPS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        dim = encoder.dim
        if pooling == "videomae":
            encoder.transformer.norm = nn.Identity()  # no parameter left unused by the forward pass
        self.pooling = pooling
        self.encoder = encoder
        self.fc_norm = nn.LayerNorm(dim, eps=FC_NORM_EPS[pooling])
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, H, W) -> logits (B, num_classes)."""
        return self.head(self.dropout(self.fc_norm(self.encoder(video).mean(1))))


def layer_id(name: str, depth: int) -> int:
    """Depth of a VideoClassifier parameter for layer-wise lr decay: 0 for the embedding, i + 1 for
    block i, depth + 1 for everything after the blocks (final norm, fc_norm, head)."""
    if name.startswith("encoder.patch_embed"):
        return 0
    if name.startswith("encoder.transformer.blocks."):
        return int(name.split(".")[3]) + 1
    return depth + 1
