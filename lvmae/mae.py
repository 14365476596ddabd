"""The video ViT encoder and the masked autoencoder (VideoMAE encoder masking + LVMAE decoder masking).

The decoder's input is the encoded visible tokens plus mask tokens at the decoder-selected positions
only, so its cost scales with the decoder budget instead of with every masked token. The model returns predictions and
masks; losses are functions in `lvmae.losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lvmae.config import IMAGENET_MEAN, IMAGENET_STD, MAEConfig, VideoSpec
from lvmae.masking import MaskPlan, plan_masks
from lvmae.pos_embed import position_table
from lvmae.tubelets import gather_tubelets
from lvmae.vit import Transformer, init_weights

# (kind, dim, grid) -> (N, dim) fixed position table; models take one as `pos_table` (lvmae.pos_embed's by
# default; `lvmae plan` passes one that gives the shape alone, on the meta device).
PositionTable = Callable[[str, int, tuple[int, int, int]], torch.Tensor]


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, K) -> (B, K, D)."""
    return x.gather(1, ids[..., None].expand(-1, -1, x.shape[-1]))


def input_stats(kind: str, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, C, 1, 1, 1), that the encoder's input norm `kind` applies to [0, 1] clips:
    ImageNet's for `imagenet`, (0, 1) (the identity) for `none`."""
    if kind == "imagenet":
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    elif kind == "none":
        mean, std = torch.zeros(in_chans), torch.ones(in_chans)
    else:
        raise ValueError(f"unknown input norm {kind!r}; expected none or imagenet")
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


def init_like_mae(module: nn.Module) -> None:
    """ViT init (init_weights), and the tubelet projection initialized like a linear layer, as MAE does."""
    init_weights(module)
    if isinstance(module, nn.Conv3d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))


class TubeletEmbed(nn.Module):
    """One linear map per t x p x p tubelet, held as a strided Conv3d (the usual checkpoint layout)."""

    def __init__(self, video: VideoSpec, dim: int):
        super().__init__()
        self.t, self.p = video.tubelet_size, video.patch_size
        self.proj = nn.Conv3d(
            video.in_chans, dim, kernel_size=(self.t, self.p, self.p), stride=(self.t, self.p, self.p)
        )

    def forward(self, video: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, D) for every token, or (B, K, D) for the tokens `ids` (B, K) only.

        With ids, only those tubelets are cut out and projected: the encoder sees 10% of a clip, so
        embedding the other 90% would be wasted work and memory.
        """
        if ids is None:
            return self.proj(video).flatten(2).transpose(1, 2)
        w = self.proj.weight  # (D, C, t, p, p) -> (D, t*p*p*C), patchify's value order
        return F.linear(
            gather_tubelets(video, ids, self.t, self.p), w.permute(0, 2, 3, 4, 1).flatten(1), self.proj.bias
        )


class VideoViT(nn.Module):
    """The encoder: input norm + tubelet embedding + fixed sine-cosine positions + transformer.

    Used by the MAE (on visible tokens only) and, alone, for downstream fine-tuning and probes. It takes
    clips in [0, 1] and applies `model.input_norm` itself, so every caller feeds it the same way.
    pos_table: what computes the position table (see PositionTable).
    """

    def __init__(self, cfg: MAEConfig, pos_table: PositionTable = position_table):
        super().__init__()
        cfg = cfg.resolved()
        self.video = cfg.video
        enc = cfg.encoder
        self.dim = enc.embed_dim
        self.patch_embed = TubeletEmbed(cfg.video, enc.embed_dim)
        self.input_norm = cfg.input_norm
        mean, std = input_stats(cfg.input_norm, cfg.video.in_chans)
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)
        table = pos_table(cfg.pos_embed, enc.embed_dim, cfg.video.grid)
        self.register_buffer("pos_embed", table[None], persistent=False)
        self.transformer = Transformer(
            enc.embed_dim,
            enc.depth,
            enc.num_heads,
            enc.mlp_ratio,
            enc.qkv_bias,
            enc.drop_path,
            enc.grad_checkpointing,
        )

    def check_input(self, video: torch.Tensor) -> None:
        v = self.video
        expected = (v.in_chans, v.num_frames, v.img_size, v.img_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"expected video of shape (B, {', '.join(map(str, expected))}), got {tuple(video.shape)}"
            )

    def normalize(self, video: torch.Tensor) -> torch.Tensor:
        """The [0, 1] clip as the tubelet embedding sees it (model.input_norm; `none` leaves it as is)."""
        if self.input_norm == "none":
            return video
        return (video - self.input_mean.to(video.dtype)) / self.input_std.to(video.dtype)

    def forward(self, video: torch.Tensor, ids_visible: torch.Tensor | None = None) -> torch.Tensor:
        """video (B, C, T, H, W) in [0, 1], ids_visible (B, N_vis) or None for all tokens -> (B, N_vis, D)."""
        self.check_input(video)
        video = self.normalize(video)
        pos = self.pos_embed.to(video.dtype).expand(video.shape[0], -1, -1)  # (B, N, D)
        if ids_visible is not None:
            pos = _gather(pos, ids_visible)  # (B, N_vis, D)
        return self.transformer(self.patch_embed(video, ids_visible) + pos)


def output_dim(cfg: MAEConfig) -> int:
    """Width of the prediction head: tubelet values, codebook logits, or per-FSQ-digit logits."""
    tgt = cfg.target
    if tgt.kind == "pixels":
        return cfg.video.tubelet_dim
    if tgt.token_loss == "softmax":
        return tgt.codebook_size
    return sum(tgt.fsq_levels)


class MAEOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 hooks the tensors a module returns only inside tuples,
    NamedTuples and dicts, and without those hooks its backward meets still-partitioned parameters."""

    pred: torch.Tensor  # (B, N_sel, out_dim): predictions for plan.ids_selected, in that order
    plan: MaskPlan


class MaskedVideoAutoencoder(nn.Module):
    """VideoMAE / LVMAE: encoder on visible tokens, decoder on visible + selected mask tokens.
    pos_table: what computes the position tables (see PositionTable)."""

    def __init__(self, cfg: MAEConfig, pos_table: PositionTable = position_table):
        super().__init__()
        cfg = cfg.resolved()
        cfg.validate()
        self.cfg = cfg
        enc, dec = cfg.encoder, cfg.decoder
        self.encoder = VideoViT(cfg, pos_table)
        self.decoder_embed = nn.Linear(enc.embed_dim, dec.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.embed_dim))
        table = pos_table(cfg.pos_embed, dec.embed_dim, cfg.video.grid)
        self.register_buffer("decoder_pos_embed", table[None], persistent=False)
        self.decoder = Transformer(
            dec.embed_dim,
            dec.depth,
            dec.num_heads,
            dec.mlp_ratio,
            dec.qkv_bias,
            dec.drop_path,
            dec.grad_checkpointing,
        )
        self.head = nn.Linear(dec.embed_dim, output_dim(cfg))
        # Through apply(): under DeepSpeed's zero.Init, parameters are already partitioned here and
        # only apply() gathers each module's parameters for the function it runs.
        self.apply(self._init_module)

    def _init_module(self, module: nn.Module) -> None:
        init_like_mae(module)
        if module is self:
            nn.init.normal_(self.mask_token, std=0.02)

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.cfg.video.grid

    def plan(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        priority: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> MaskPlan:
        """Draw this step's encoder and decoder masks (priority: (B, T', H', W') for `adaptive`)."""
        return plan_masks(self.cfg.masking, batch, self.grid, generator, priority, device)

    def forward_encoder(self, video: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """-> (B, N_vis, D_enc) encoded visible tokens."""
        return self.encoder(video, plan.ids_visible)

    def forward_decoder(self, latent: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """latent (B, N_vis, D_enc) -> predictions (B, N_sel, out_dim) for plan.ids_selected."""
        b = latent.shape[0]
        pos = self.decoder_pos_embed.to(latent.dtype).expand(b, -1, -1)  # (B, N, Dd)
        visible = self.decoder_embed(latent) + _gather(pos, plan.ids_visible)  # (B, N_vis, Dd)
        queries = self.mask_token.to(latent.dtype) + _gather(pos, plan.ids_selected)  # (B, N_sel, Dd)
        x = self.decoder(torch.cat([visible, queries], dim=1))
        return self.head(x[:, plan.num_visible :])

    def forward(
        self,
        video: torch.Tensor,
        plan: MaskPlan | None = None,
        priority: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        encode: bool = False,
    ) -> MAEOutput | torch.Tensor:
        """video (B, C, T, H, W). Pass a `plan`, or let one be drawn (with `priority` for `adaptive`).
        encode=True: only the encoder's tokens of the whole clip (B, N, D), nothing masked (the in-run
        probe), through the same tubelet path as training, so that under ZeRO-3 the call goes through the
        engine like a training step (its parameters are gathered the same way)."""
        if encode:
            ids = torch.arange(self.cfg.video.num_tokens, device=video.device).expand(video.shape[0], -1)
            return self.encoder(video, ids)
        if plan is None:
            plan = self.plan(video.shape[0], generator, priority, video.device)
        latent = self.forward_encoder(video, plan)
        return MAEOutput(self.forward_decoder(latent, plan), plan)
