"""The convolutional nets of the FSQ-MagViT tokenizer: encoder, decoder and token scorer (3D convs).

Every conv pads explicitly (`PaddedConv3d`): zeros in space, the edge frames repeated in time (or zeros),
and with causal=True all of the time padding before the clip. Downsampling is kernel 4, stride 2, so
each latent and each score stays centred on its own tubelet (lvmae.tokenizer puts them together).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lvmae.tokenizer_config import TokenizerConfig


class PaddedConv3d(nn.Conv3d):
    """Conv3d whose padding is explicit: zeros in space, `temporal_padding` in time, and with causal=True
    all of it before the clip, so no output depends on a later frame (MAGVIT-v2's causal conv).

    Padding keeps every output centred on (or, causal, ending at) the input it comes from: with stride s
    and kernel k it pads k - s in all, so output i of a stride-2 kernel-4 conv covers inputs 2i-1..2i+2
    (2i-2..2i+1 causal), centred on the pair 2i, 2i+1 that it summarises.
    """

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], stride=(1, 1, 1), *, cfg):
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0)
        (kt, kh, kw), (st, sh, sw) = kernel, stride
        pt, ph, pw = kt - st, kh - sh, kw - sw
        self.space_pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        self.time_pad = (pt, 0) if cfg.causal else (pt // 2, pt - pt // 2)
        self.time_mode = "replicate" if cfg.temporal_padding == "replicate" else "constant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.space_pad):
            x = F.pad(x, (*self.space_pad, 0, 0))
        if any(self.time_pad):
            x = F.pad(x, (0, 0, 0, 0, *self.time_pad), mode=self.time_mode)
        return super().forward(x)


class ChannelNorm(nn.Module):
    """Layer norm over the channels at each position of a (B, C, T, H, W) map, with an affine per channel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps).movedim(-1, 1)


def norm_layer(cfg: TokenizerConfig, channels: int) -> nn.Module:
    if cfg.norm == "channel":
        return ChannelNorm(channels)
    return nn.GroupNorm(math.gcd(cfg.num_groups, channels), channels)


class ResBlock(nn.Module):
    """MAGVIT residual block: (GroupNorm, SiLU, Conv3d 3x3x3) twice, 1x1x1 skip when channels change."""

    def __init__(self, c_in: int, c_out: int, cfg: TokenizerConfig):
        super().__init__()
        self.norm1 = norm_layer(cfg, c_in)
        self.conv1 = PaddedConv3d(c_in, c_out, (3, 3, 3), cfg=cfg)
        self.norm2 = norm_layer(cfg, c_out)
        self.conv2 = PaddedConv3d(c_out, c_out, (3, 3, 3), cfg=cfg)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _level_channels(cfg: TokenizerConfig) -> list[int]:
    return [cfg.base_channels * m for m in cfg.channel_mult]


def _time_halvings(cfg: TokenizerConfig) -> int:
    """Resolution steps that also halve (encoder) or double (decoder) T: log2(tubelet_size)."""
    return int(math.log2(cfg.video.tubelet_size))


class Encoder(nn.Module):
    """(B, C, T, H, W) -> (B, latent_dim, T/t, H/p, W/p); latent (i, j, k) is centred on its tubelet."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chans, nt = _level_channels(cfg), _time_halvings(cfg)
        self.conv_in = PaddedConv3d(cfg.video.in_chans, chans[0], (3, 3, 3), cfg=cfg)
        layers: list[nn.Module] = []
        for i, ch in enumerate(chans):
            layers += [ResBlock(ch, ch, cfg) for _ in range(cfg.num_res_blocks)]
            if i < len(chans) - 1:
                # Kernel 4, stride 2 halves a side and stays centred (a 3-wide kernel would shift each level
                # half a pixel, half a token in all). The conv also moves to the next level's width.
                halve_t = i < nt
                kernel, stride = (4 if halve_t else 3, 4, 4), (2 if halve_t else 1, 2, 2)
                layers.append(PaddedConv3d(ch, chans[i + 1], kernel, stride, cfg=cfg))
        self.blocks = nn.Sequential(*layers)
        self.norm_out = norm_layer(cfg, chans[-1])
        self.conv_out = nn.Conv3d(chans[-1], cfg.latent_dim, 1)
        v = cfg.video
        tubelet = (v.tubelet_size, v.patch_size, v.patch_size)
        self.patch = (
            nn.Conv3d(v.in_chans, cfg.latent_dim, tubelet, stride=tubelet) if cfg.patch_skip else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))
        return z if self.patch is None else z + self.patch(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsample then conv (no transposed conv: it leaves checkerboard artefacts)."""

    def __init__(self, c_in: int, c_out: int, time: bool, cfg: TokenizerConfig):
        super().__init__()
        self.scale = (2.0 if time else 1.0, 2.0, 2.0)
        self.conv = PaddedConv3d(c_in, c_out, (3, 3, 3), cfg=cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class Decoder(nn.Module):
    """(B, c_in, T', H', W') -> (B, C, T, H, W); the encoder mirrored, output unbounded."""

    def __init__(self, cfg: TokenizerConfig, c_in: int):
        super().__init__()
        chans, nt = _level_channels(cfg), _time_halvings(cfg)
        self.conv_in = PaddedConv3d(c_in, chans[-1], (3, 3, 3), cfg=cfg)
        layers: list[nn.Module] = []
        for i in reversed(range(len(chans))):
            layers += [ResBlock(chans[i], chans[i], cfg) for _ in range(cfg.num_res_blocks)]
            if i > 0:
                # Undoes the encoder step from level i-1 to i, which halved T when i-1 < log2(t).
                layers.append(Upsample(chans[i], chans[i - 1], time=i - 1 < nt, cfg=cfg))
        self.blocks = nn.Sequential(*layers)
        self.norm_out = norm_layer(cfg, chans[0])
        self.conv_out = PaddedConv3d(chans[0], cfg.video.in_chans, (3, 3, 3), cfg=cfg)
        v = cfg.video
        tubelet = (v.tubelet_size, v.patch_size, v.patch_size)
        self.patch = (
            nn.ConvTranspose3d(c_in, v.in_chans, tubelet, stride=tubelet, bias=False)
            if cfg.patch_skip
            else None
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))
        return x if self.patch is None else x + self.patch(z)


class TokenScorer(nn.Module):
    """(B, C, T, H, W) -> (B, T', H', W') logits, one per token, each from its own tubelet first.

    Two views of each tubelet, both exactly aligned with its token: a tubelet-sized, tubelet-strided conv
    (its pixels, linearly) and the tubelet average of a full-resolution 3x3x3 conv's activations (local
    texture and motion energy, which a linear view of raw pixels finds slowly). With scorer_input
    `frames_and_differences` that conv also sees each frame minus the one before (zero for the first).
    A 1x1x1 conv mixes the two views into the token's own features; two 3x3x3 convs on the token grid
    (padded like the tokenizer's) add what its neighbours in space and time say, as a residual, so a
    token's score answers to its own tubelet first (without the residual, a random 5x5x5 stack spreads
    a token's influence almost evenly over its neighbours: docs/tokenizer.md).
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        sc, v = cfg.scorer_channels, cfg.video
        self.tubelet = (v.tubelet_size, v.patch_size, v.patch_size)
        self.differences = cfg.scorer_input == "frames_and_differences"
        stem_in = 2 * v.in_chans if self.differences else v.in_chans
        self.stem = PaddedConv3d(stem_in, sc, (3, 3, 3), cfg=cfg)
        self.patch = nn.Conv3d(v.in_chans, sc, self.tubelet, stride=self.tubelet)
        self.local = nn.Sequential(norm_layer(cfg, 2 * sc), nn.SiLU(), nn.Conv3d(2 * sc, sc, 1))
        self.context = nn.Sequential(
            norm_layer(cfg, sc),
            nn.SiLU(),
            PaddedConv3d(sc, sc, (3, 3, 3), cfg=cfg),
            norm_layer(cfg, sc),
            nn.SiLU(),
            PaddedConv3d(sc, sc, (3, 3, 3), cfg=cfg),
        )
        self.out = nn.Sequential(norm_layer(cfg, sc), nn.SiLU())
        self.head = nn.Conv3d(sc, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem_in = x
        if self.differences:
            diff = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], 2)
            stem_in = torch.cat([x, diff], 1)  # (B, 2C, T, H, W)
        energy = F.avg_pool3d(F.silu(self.stem(stem_in)), self.tubelet)  # (B, sc, T', H', W')
        f = self.local(torch.cat([energy, self.patch(x)], 1))
        f = f + self.context(f)
        return self.head(self.out(f)).squeeze(1)
