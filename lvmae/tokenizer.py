"""FSQ-MagViT tokenizer with a token scorer (LVMAE, "Extending Video Masked Autoencoders to 128 frames").

A 3D-conv encoder maps a clip (B, C, T, H, W) to latents on exactly the MAE tubelet grid (T/t, H/p, W/p),
so each code is the target of one MAE token. A small CNN scorer gives each token a priority in (0, 1); a
differentiable top-k keeps a fraction of tokens, and the decoder rebuilds the clip from the kept latents
weighted by their scores. The reconstruction loss therefore teaches the scorer which tokens carry the most
information: its scores later choose which tokens the MAE decoder reconstructs.

Once trained the tokenizer is frozen and identified by `tokenizer_id` (a hash of config and weights), which
names its token store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lvmae.config import TokenizerConfig, load_config, to_dict
from lvmae.fsq import FSQ, LFQ, Quantized
from lvmae.weights import replace_atomically, write_text_atomically

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ResBlock(nn.Module):
    """MAGVIT residual block: (GroupNorm, SiLU, Conv3d 3x3x3) twice, 1x1x1 skip when channels change."""

    def __init__(self, c_in: int, c_out: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, c_in)
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
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
    """(B, C, T, H, W) -> (B, latent_dim, T/t, H/p, W/p)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chans, g, nt = _level_channels(cfg), cfg.num_groups, _time_halvings(cfg)
        self.conv_in = nn.Conv3d(cfg.video.in_chans, chans[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, ch in enumerate(chans):
            layers += [ResBlock(ch, ch, g) for _ in range(cfg.num_res_blocks)]
            if i < len(chans) - 1:
                # The strided conv also moves to the next level's width, so num_res_blocks=0 still works.
                stride = (2 if i < nt else 1, 2, 2)
                layers.append(nn.Conv3d(ch, chans[i + 1], 3, stride=stride, padding=1))
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, chans[-1])
        self.conv_out = nn.Conv3d(chans[-1], cfg.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(x)))


class Upsample(nn.Module):
    """Nearest-neighbour upsample then conv (no transposed conv: it leaves checkerboard artefacts)."""

    def __init__(self, c_in: int, c_out: int, time: bool):
        super().__init__()
        self.scale = (2.0 if time else 1.0, 2.0, 2.0)
        self.conv = nn.Conv3d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class Decoder(nn.Module):
    """(B, latent_dim, T', H', W') -> (B, C, T, H, W); the encoder mirrored, output unbounded."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chans, g, nt = _level_channels(cfg), cfg.num_groups, _time_halvings(cfg)
        self.conv_in = nn.Conv3d(cfg.latent_dim, chans[-1], 3, padding=1)
        layers: list[nn.Module] = []
        for i in reversed(range(len(chans))):
            layers += [ResBlock(chans[i], chans[i], g) for _ in range(cfg.num_res_blocks)]
            if i > 0:
                # Undoes the encoder step from level i-1 to i, which halved T when i-1 < log2(t).
                layers.append(Upsample(chans[i], chans[i - 1], time=i - 1 < nt))
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, chans[0])
        self.conv_out = nn.Conv3d(chans[0], cfg.video.in_chans, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(x)))


class TokenScorer(nn.Module):
    """Small strided CNN on the clip: (B, C, T, H, W) -> (B, T', H', W') logits, one per token."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        sc, nt = cfg.scorer_channels, _time_halvings(cfg)
        groups = math.gcd(cfg.num_groups, sc)  # validate() does not tie scorer_channels to num_groups
        steps = len(cfg.channel_mult) - 1  # the encoder's downsampling schedule, so the grids match
        s = 2 if steps > 0 else 1  # patch_size 1 still gets one (stride-1) conv
        layers: list[nn.Module] = []
        c_in = cfg.video.in_chans
        for i in range(max(steps, 1)):
            stride = (2 if i < nt else 1, s, s)
            layers += [nn.Conv3d(c_in, sc, 3, stride=stride, padding=1), nn.GroupNorm(groups, sc), nn.SiLU()]
            c_in = sc
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv3d(sc, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(1)


def soft_topk_mask(scores: torch.Tensor, keep_ratio: float, temperature: float) -> torch.Tensor:
    """Differentiable top-k: (B, N) scores -> (B, N) mask.

    The forward value is exactly the hard 0/1 mask of the k = max(1, round(keep_ratio * N)) largest scores
    per row (ties broken by torch.topk, so the count is always k). The backward pass goes through
    sigmoid((s - threshold) / temperature), with the threshold halfway between the k-th and (k+1)-th
    largest score: every token, kept or not, gets a gradient pushing it across the boundary.
    """
    n = scores.shape[1]
    k = min(n, max(1, round(keep_ratio * n)))
    top = scores.detach().topk(min(k + 1, n), dim=1)  # values (B, k+1) sorted descending
    hard = torch.zeros_like(scores).scatter_(1, top.indices[:, :k], 1.0)
    if k < n:
        threshold = (top.values[:, k - 1] + top.values[:, k]) / 2
    else:  # everything kept: put the boundary just below the smallest score
        threshold = top.values[:, k - 1] - temperature
    x = (scores - threshold[:, None]) / temperature
    # sigmoid(x) for large x rounds to 1.0 in float32 and its gradient y * (1 - y) to 0; 1 - sigmoid(-x) has
    # the same value but keeps the gradient, so tokens far above the threshold still learn.
    soft = torch.where(x >= 0, 1 - torch.sigmoid(-x), torch.sigmoid(x))
    # hard + (soft - soft) is bit-exact `hard` in the forward pass; (hard + soft) - soft would not be.
    return hard + (soft - soft.detach())


class TokenizerOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 hooks a module's output tensors only inside tuples and dicts."""

    recon: torch.Tensor  # (B, C, T, H, W) unbounded reconstruction
    codes: torch.Tensor  # (B, T', H', W') int64 code ids
    priority: torch.Tensor  # (B, T', H', W') scores in (0, 1)
    keep: torch.Tensor  # (B, T', H', W') hard 0/1 values, soft gradients
    aux_loss: torch.Tensor  # scalar quantizer loss (LFQ entropy; zero for FSQ)


class Tokenizer(nn.Module):
    """FSQ-MagViT (or LFQ) tokenizer whose latent grid is the MAE token grid, plus a token scorer."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.scorer = TokenScorer(cfg)
        self.quantizer: FSQ | LFQ = (
            FSQ(cfg.fsq_levels) if cfg.quantizer == "fsq" else LFQ(cfg.lfq_bits, cfg.lfq_entropy_weight)
        )

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.cfg.video.grid

    def check_video(self, video: torch.Tensor) -> None:
        """Raise ValueError unless video is (B, C, T, H, W) with the configured C, T, H, W."""
        v = self.cfg.video
        expected = (v.in_chans, v.num_frames, v.img_size, v.img_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"tokenizer expects video of shape (B, {', '.join(map(str, expected))}) = (B, C, T, H, W) "
                f"for its token grid {self.grid}; got {tuple(video.shape)}"
            )

    def _quantize(self, video: torch.Tensor) -> tuple[Quantized, torch.Tensor]:
        """-> quantized latents (B, T', H', W', d) channel-last, and scores (B, T', H', W')."""
        self.check_video(video)
        z = self.encoder(video)  # (B, d, T', H', W')
        q = self.quantizer(z.permute(0, 2, 3, 4, 1))
        scores = torch.sigmoid(self.scorer(video).float())
        return q, scores

    def _decode(
        self, z_q: torch.Tensor, scores: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z_q (B, T', H', W', d), scores (B, T', H', W') -> (reconstruction (B, C, T, H, W), keep mask)."""
        b = scores.shape[0]
        keep = soft_topk_mask(scores.reshape(b, -1), self.cfg.keep_ratio, self.cfg.topk_temperature)
        keep = keep.view_as(scores)  # (B, T', H', W')
        # The decoder sees only kept tokens, scaled by their scores, so reconstruction quality depends on
        # which tokens the scorer ranks highest and how much it trusts them.
        z_in = z_q * (keep * scores)[..., None]  # (B, T', H', W', d)
        return self.decoder(z_in.permute(0, 4, 1, 2, 3).to(dtype)), keep

    def forward(self, video: torch.Tensor) -> TokenizerOutput:
        q, scores = self._quantize(video)
        recon, keep = self._decode(q.z_q, scores, video.dtype)
        return TokenizerOutput(recon, q.codes, scores, keep, q.aux_loss)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
        """codes, priority (B, T', H', W') -> reconstruction (B, C, T, H, W), decoded as forward() does:
        the top keep_ratio of tokens by priority, weighted by it. Turns predicted codes back into pixels."""
        z_q = self.quantizer.codes_to_latent(codes)
        dtype = next(self.decoder.parameters()).dtype
        return self._decode(z_q, priority.float(), dtype)[0]

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, T, H, W) -> codes (B, T', H', W') int64, priority (B, T', H', W') float32."""
        was_training = self.training
        self.eval()  # LFQ's entropy term is training-only; the codes never depend on it, but stay explicit
        try:
            q, scores = self._quantize(video)
        finally:
            self.train(was_training)
        return q.codes, scores


def tokenizer_loss(out: TokenizerOutput, video: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE reconstruction + quantizer aux loss -> (loss, {"recon", "aux"} detached for logging)."""
    recon = F.mse_loss(out.recon.float(), video.float())
    loss = recon + out.aux_loss
    return loss, {"recon": recon.detach(), "aux": out.aux_loss.detach()}


def _config_json(cfg: TokenizerConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))


def tokenizer_id(model: Tokenizer) -> str:
    """Stable id of config + weights: "<quantizer>-" + 16 hex chars of a sha256.

    Hashes the canonical config JSON, then every state_dict tensor's name, dtype, shape and raw bytes in
    sorted name order, so equal configs and weights give equal ids on any machine or device.
    """
    h = hashlib.sha256(_config_json(model.cfg).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        # A header per tensor keeps the byte stream unambiguous (no two tensors can run together).
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{model.cfg.quantizer}-{h.hexdigest()[:16]}"


def save_tokenizer(model: Tokenizer, directory: str | os.PathLike[str]) -> str:
    """Write model.safetensors then config.json (with "tokenizer_id") into `directory`; -> the id.

    config.json goes last, so its presence (and its id matching the weights) means the save is complete.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tid = tokenizer_id(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    replace_atomically(d, WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"tokenizer_id": tid}))

    config = {**to_dict(model.cfg), "tokenizer_id": tid}
    write_text_atomically(d / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
    return tid


def load_tokenizer(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild a Tokenizer from `directory` (safetensors only, never pickle) and verify its id.

    Raises ValueError if the files are missing, the weights do not fit the config, or the stored id differs
    from the one recomputed from config and weights (a tampered or mixed-up directory).
    """
    d = Path(directory)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise ValueError(f"{d} is not a saved tokenizer: needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    raw = json.loads((d / CONFIG_FILE).read_text())
    stored = raw.pop("tokenizer_id", None)
    if not isinstance(stored, str):
        raise ValueError(f"{d / CONFIG_FILE} has no tokenizer_id")
    model = Tokenizer(load_config(TokenizerConfig, [raw]))
    state = load_file(d / WEIGHTS_FILE, device=str(device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{d / WEIGHTS_FILE} does not fit the tokenizer in {d / CONFIG_FILE}: {err}"
        ) from None
    with safe_open(d / WEIGHTS_FILE, framework="pt") as f:
        weights_id = (f.metadata() or {}).get("tokenizer_id")
    actual = tokenizer_id(model)
    if stored != actual or weights_id not in (None, actual):
        raise ValueError(
            f"tokenizer id mismatch in {d}: config.json says {stored!r}, weights say {weights_id!r}, "
            f"but config and weights hash to {actual!r}"
        )
    return model.to(device)
