"""FSQ-MagViT tokenizer with a token scorer (LVMAE, "Extending Video Masked Autoencoders to 128 frames").

A 3D-conv encoder maps a clip (B, C, T, H, W) to latents on exactly the MAE tubelet grid (T/t, H/p, W/p),
each centred on its own tubelet, so each code is the target of one MAE token. A small CNN scorer gives
each token a priority (a logit, computed from its own tubelet and its neighbours). While training, a
differentiable top-k (the perturbed maximum of lvmae.topk) keeps a fraction of the tokens and the decoder
rebuilds the clip from them, a learned mask token standing in for the rest; with the `hold` decoder
context it also gets, at each position, the latest kept latent, so a token that repeats what was kept
before adds nothing. The reconstruction loss therefore teaches the scorer which tokens carry information
the others do not: what changes. Its scores later choose which tokens the MAE decoder reconstructs.

Once trained the tokenizer is frozen and identified by `tokenizer_id` (a hash of config and weights), which
names its token store. docs/tokenizer.md has the design, the measurements and the diagnostics.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lvmae.config import load_config, to_dict
from lvmae.fsq import FSQ, LFQ, Quantized
from lvmae.magvit import Decoder, Encoder, TokenScorer
from lvmae.tokenizer_config import TokenizerConfig
from lvmae.topk import (
    hard_topk_mask,
    perturbed_topk_mask,
    sigmoid_topk_mask,
    standardize,
    topk_count,
)
from lvmae.weights import replace_atomically, write_text_atomically

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def held_latents(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """z (B, T', H', W', d), keep (B, T', H', W') in [0, 1] -> (B, T', H', W', d): at each time step the
    latest kept latent at the same position, h_t = keep_t z_t + (1 - keep_t) h_{t-1}, h_0 = z_0 (soft
    masks blend, hard ones hold). Causal: h_t depends on nothing after t."""
    m = keep[..., None]
    held = [z[:, 0]]
    for t in range(1, z.shape[1]):
        held.append(m[:, t] * z[:, t] + (1 - m[:, t]) * held[-1])
    return torch.stack(held, 1)


class TokenizerOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 hooks a module's output tensors only inside tuples and dicts."""

    recon: torch.Tensor  # (B, C, T, H, W) unbounded reconstruction
    codes: torch.Tensor  # (B, T', H', W') int64 code ids
    priority: torch.Tensor  # (B, T', H', W') float32 scorer logits: higher is more important
    keep: torch.Tensor  # (B, T', H', W') in [0, 1]: how much of each token the decoder saw
    aux_loss: torch.Tensor  # scalar quantizer loss (LFQ entropy; zero for FSQ)


class Tokenizer(nn.Module):
    """FSQ-MagViT (or LFQ) tokenizer whose latent grid is the MAE token grid, plus a token scorer.

    Training: the decoder sees the kept tokens (a differentiable top-k of the scores, plus any random
    context tokens) and a learned mask token everywhere else. Inference (eval mode, `decode_codes`): the
    hard top keep_ratio by priority.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.latent_dim
        self.encoder = Encoder(cfg)
        c_in = {"none": d, "temporal_mean": 2 * d + 1, "keyframe": 2 * d, "hold": 2 * d}[cfg.decoder_context]
        self.decoder = Decoder(cfg, c_in)
        self.scorer = TokenScorer(cfg)
        if cfg.dropped_tokens == "mask_token":  # (no parameter that no forward uses: ZeRO would wait for it)
            self.mask_token = nn.Parameter(torch.zeros(d))
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
        """-> quantized latents (B, T', H', W', d) channel-last, and logits (B, T', H', W') float32."""
        self.check_video(video)
        x = video * 2 - 1  # centred: inputs all of one sign push first-layer outputs (and tanh) to saturate
        z = self.encoder(x)  # (B, d, T', H', W')
        q = self.quantizer(z.permute(0, 2, 3, 4, 1))
        # The scorer is small: it runs outside autocast, in its weights' precision (float32 unless an
        # engine cast them), so the priorities of close tokens do not tie as bf16 logits would.
        with torch.autocast(x.device.type, enabled=False):
            logits = self.scorer(x.to(self.scorer.head.weight.dtype))
        return q, logits.float()

    def select(
        self, logits: torch.Tensor, keep_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """logits (B, T', H', W') -> keep (B, T', H', W') in [0, 1]: the differentiable top-k (plus random
        context tokens) in training mode, the hard top-k in eval mode. keep_ratio: None for the config's.

        k = keep_ratio * (all tokens). With a `keyframe` or `hold` decoder context the first time step is
        kept whatever the scores, and the k tokens are chosen among the later ones."""
        cfg, b = self.cfg, logits.shape[0]
        k = topk_count(logits[0].numel(), cfg.keep_ratio if keep_ratio is None else keep_ratio)
        keyframe = cfg.decoder_context in ("keyframe", "hold")
        candidates = logits[:, 1:] if keyframe else logits
        flat = candidates.reshape(b, -1)  # (B, n)
        n = flat.shape[1]
        k = min(k, n)
        if k >= n:
            keep = torch.ones_like(flat)
        elif not self.training:
            keep = hard_topk_mask(flat, k)
        elif cfg.topk == "perturbed":
            scores = standardize(flat) if cfg.standardize_logits else flat
            keep = perturbed_topk_mask(scores, k, cfg.topk_sigma, cfg.topk_samples, generator)
        else:
            keep = sigmoid_topk_mask(flat, k, cfg.topk_temperature)
        if self.training and cfg.context_ratio > 0 and k < n:
            u = torch.rand((b, n), generator=generator).to(flat.device)
            context = (u < cfg.context_ratio).to(flat.dtype)
            keep = 1 - (1 - keep) * (1 - context)  # context tokens are in for free: no gradient to them
        keep = keep.view_as(candidates)
        if keyframe:
            keep = torch.cat([torch.ones_like(logits[:, :1]), keep], 1)
        return keep

    def _decode(self, z_q: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """z_q (B, T', H', W', d), keep (B, T', H', W') -> reconstruction (B, C, T, H, W)."""
        m = keep[..., None]  # (B, T', H', W', 1)
        z_in = m * z_q  # dropped tokens: zeros, or the learned mask token
        if self.cfg.dropped_tokens == "mask_token":
            z_in = z_in + (1 - m) * self.mask_token
        if self.cfg.decoder_context == "temporal_mean":
            cover = m.sum(1, keepdim=True)  # (B, 1, H', W', 1): how much of this position was kept
            mean = (m * z_q).sum(1, keepdim=True) / cover.clamp_min(1e-6)
            t = z_q.shape[1]
            z_in = torch.cat([z_in, mean.expand_as(z_q), (cover / t).expand(*m.shape)], -1)
        elif self.cfg.decoder_context == "keyframe":
            z_in = torch.cat([z_in, z_q[:, :1].expand_as(z_q)], -1)
        elif self.cfg.decoder_context == "hold":
            z_in = torch.cat([z_in, held_latents(z_q, keep)], -1)
        return self.decoder(z_in.permute(0, 4, 1, 2, 3).to(dtype))

    def forward(
        self,
        video: torch.Tensor,
        generator: torch.Generator | None = None,
        keep_ratio: float | None = None,
    ) -> TokenizerOutput:
        """video (B, C, T, H, W). generator: the top-k noise and context draws; keep_ratio: this step's."""
        q, logits = self._quantize(video)
        keep = self.select(logits, keep_ratio, generator)
        recon = self._decode(q.z_q, keep, video.dtype)
        return TokenizerOutput(recon, q.codes, logits, keep, q.aux_loss)

    @torch.no_grad()
    def decode_codes(
        self, codes: torch.Tensor, priority: torch.Tensor, keep_ratio: float | None = None
    ) -> torch.Tensor:
        """codes, priority (B, T', H', W') -> reconstruction (B, C, T, H, W), decoded as inference does:
        the top keep_ratio of tokens by priority (default the config's; 1.0 decodes every token)."""
        z_q = self.quantizer.codes_to_latent(codes)
        was_training = self.training
        self.eval()
        try:
            keep = self.select(priority.float(), keep_ratio)
        finally:
            self.train(was_training)
        dtype = next(self.decoder.parameters()).dtype
        return self._decode(z_q.to(keep.dtype), keep, dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, T, H, W) -> codes (B, T', H', W') int64, priority (B, T', H', W') float32 logits."""
        was_training = self.training
        self.eval()  # LFQ's entropy term is training-only; the codes never depend on it, but stay explicit
        try:
            q, logits = self._quantize(video)
        finally:
            self.train(was_training)
        return q.codes, logits


def tokenizer_loss(out: TokenizerOutput, video: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE reconstruction + quantizer aux loss -> (loss, {"recon", "aux"} detached for logging)."""
    recon = F.mse_loss(out.recon.float(), video.float())
    loss = recon + out.aux_loss
    return loss, {"recon": recon.detach(), "aux": out.aux_loss.detach()}


# The module layout saved weights belong to: 2 since issue 8 (centred scorer and encoder, mask token).
# Saved in config.json beside the id (not hashed); a directory without it was saved before (1).
ARCHITECTURE = 2


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

    config = {**to_dict(model.cfg), "tokenizer_id": tid, "architecture": ARCHITECTURE}
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
    architecture = raw.pop("architecture", 1)
    if architecture != ARCHITECTURE:
        raise ValueError(
            f"{d} holds a tokenizer of architecture {architecture} (saved by another lvmae version); this "
            f"version builds architecture {ARCHITECTURE} (docs/tokenizer.md): train the tokenizer again"
        )
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
