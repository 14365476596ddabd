"""Tokenizer: latent grid = MAE token grid, exact differentiable top-k, scorer gradients, overfitting a
real clip, and a safetensors save/load whose id catches any change to config or weights."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from ingest.frames import load_clip
from lvmae.config import ConfigError, TokenizerConfig, VideoSpec
from lvmae.tokenizer import (
    Tokenizer,
    load_tokenizer,
    save_tokenizer,
    soft_topk_mask,
    tokenizer_id,
    tokenizer_loss,
)


def small_cfg(
    num_frames: int = 8, img_size: int = 32, patch_size: int = 8, tubelet_size: int = 2, **kw: object
) -> TokenizerConfig:
    levels = int(math.log2(patch_size)) + 1
    mult = [1, 1, 2, 2, 4, 4][:levels]
    video = VideoSpec(
        num_frames=num_frames, img_size=img_size, patch_size=patch_size, tubelet_size=tubelet_size
    )
    args: dict = dict(video=video, base_channels=16, channel_mult=mult, num_groups=8, scorer_channels=16)
    args.update(kw)
    return TokenizerConfig(**args)


@pytest.mark.parametrize(
    "geometry",
    [
        dict(num_frames=8, img_size=32, patch_size=8, tubelet_size=2),
        dict(num_frames=4, img_size=16, patch_size=4, tubelet_size=4),
        dict(num_frames=6, img_size=24, patch_size=2, tubelet_size=1),
    ],
)
@pytest.mark.parametrize("quantizer", ["fsq", "lfq"])
def test_latent_grid_is_the_token_grid(geometry: dict, quantizer: str) -> None:
    torch.manual_seed(0)
    cfg = small_cfg(**geometry, quantizer=quantizer, fsq_levels=[8, 5, 5], lfq_bits=6)
    model = Tokenizer(cfg)
    t, p = geometry["tubelet_size"], geometry["patch_size"]
    grid = (geometry["num_frames"] // t, geometry["img_size"] // p, geometry["img_size"] // p)
    video = torch.rand(2, 3, geometry["num_frames"], geometry["img_size"], geometry["img_size"])

    out = model(video)
    assert out.recon.shape == video.shape
    assert out.codes.shape == out.priority.shape == out.keep.shape == (2, *grid)
    assert out.codes.dtype == torch.int64
    assert out.codes.min() >= 0 and out.codes.max() < cfg.codebook_size
    assert ((out.priority > 0) & (out.priority < 1)).all()
    k = max(1, round(cfg.keep_ratio * math.prod(grid)))
    assert (out.keep.flatten(1).sum(1) == k).all()
    assert torch.isfinite(out.recon).all() and torch.isfinite(out.aux_loss)

    codes, priority = model.encode(video)
    assert codes.shape == priority.shape == (2, *grid)
    assert torch.equal(codes, out.codes)
    assert priority.dtype == torch.float32 and not priority.requires_grad
    assert model.training  # encode() restores the mode it found


def test_soft_topk_mask_exact_and_differentiable() -> None:
    gen = torch.Generator().manual_seed(0)
    for n, ratio in [(37, 0.25), (10, 0.01), (12, 1.0), (100, 0.5)]:
        scores = torch.rand(4, n, generator=gen).requires_grad_()
        mask = soft_topk_mask(scores, ratio, temperature=0.05)
        k = max(1, round(ratio * n))
        assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
        assert (mask.detach().sum(1) == k).all()
        expected = torch.zeros(4, n).scatter_(1, scores.detach().topk(k, dim=1).indices, 1.0)
        assert torch.equal(mask.detach(), expected)

        # Weighting every token differently makes each token's gradient its own sigmoid slope.
        (mask * torch.linspace(1, 2, n)).sum().backward()
        grad = scores.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert (grad != 0).all(), "every token, kept or not, must get a gradient"


def test_soft_topk_mask_ties_keep_exactly_k() -> None:
    scores = torch.full((3, 20), 0.5)
    assert (soft_topk_mask(scores, 0.25, 0.05).sum(1) == 5).all()


def test_gradients_reach_the_scorer() -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_cfg())
    video = torch.rand(2, 3, 8, 32, 32)
    loss, parts = tokenizer_loss(model(video), video)
    assert set(parts) == {"recon", "aux"}
    loss.backward()
    for name, param in model.scorer.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_overfits_one_real_clip(sample_videos: dict) -> None:
    torch.manual_seed(0)
    clip = load_clip(sample_videos["bikes"], 8, 32)[None]  # (1, 3, 8, 32, 32) in [0, 1]
    # Narrow (8 channels) so 40 steps stay a few seconds on 2 CPU cores.
    model = Tokenizer(small_cfg(base_channels=8, num_groups=4))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    start = time.perf_counter()
    for _ in range(40):
        loss, parts = tokenizer_loss(model(clip), clip)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["recon"].item())
    elapsed = time.perf_counter() - start
    first, last = losses[0], losses[-1]
    print(f"overfit: recon MSE {first:.4f} -> {last:.4f} in {len(losses)} steps, {elapsed:.1f} s")
    assert last < 0.3 * first
    # Beating the clip's variance means it does better than predicting the mean colour everywhere.
    assert last < 0.8 * clip.var().item()


@pytest.mark.parametrize("quantizer", ["fsq", "lfq"])
def test_save_load_round_trip(tmp_path, quantizer: str) -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_cfg(quantizer=quantizer, lfq_bits=8))
    video = torch.rand(2, 3, 8, 32, 32)
    tid = save_tokenizer(model, tmp_path)
    assert tid == tokenizer_id(model) and tid.startswith(f"{quantizer}-") and len(tid) == len(quantizer) + 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp left

    loaded = load_tokenizer(tmp_path)
    assert tokenizer_id(loaded) == tid
    for a, b in zip(model.encode(video), loaded.encode(video)):
        assert torch.equal(a, b)

    # Saving again over the same directory is fine and gives the same id.
    assert save_tokenizer(loaded, tmp_path) == tid


def test_id_is_stable_and_changes_with_any_weight() -> None:
    torch.manual_seed(0)
    a = Tokenizer(small_cfg())
    torch.manual_seed(0)
    b = Tokenizer(small_cfg())
    assert tokenizer_id(a) == tokenizer_id(b)
    with torch.no_grad():
        b.decoder.conv_out.bias[0] += 1e-6
    assert tokenizer_id(a) != tokenizer_id(b)
    torch.manual_seed(0)
    c = Tokenizer(small_cfg(keep_ratio=0.5))  # same weights, different config
    assert tokenizer_id(a) != tokenizer_id(c)


def test_load_refuses_tampered_directories(tmp_path) -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_cfg())
    save_tokenizer(model, tmp_path)
    config = tmp_path / "config.json"
    original = json.loads(config.read_text())

    # A config change that still fits the weights is caught by the id.
    config.write_text(json.dumps({**original, "keep_ratio": 0.5}))
    with pytest.raises(ValueError, match="tokenizer id mismatch"):
        load_tokenizer(tmp_path)

    config.write_text(json.dumps({**original, "tokenizer_id": "fsq-0000000000000000"}))
    with pytest.raises(ValueError, match="tokenizer id mismatch"):
        load_tokenizer(tmp_path)

    config.write_text(json.dumps({**original, "base_channels": 32}))
    with pytest.raises(ValueError, match="does not fit"):
        load_tokenizer(tmp_path)

    del original["tokenizer_id"]
    config.write_text(json.dumps(original))
    with pytest.raises(ValueError, match="no tokenizer_id"):
        load_tokenizer(tmp_path)

    # Weights from another tokenizer under the right config.
    torch.manual_seed(1)
    save_tokenizer(Tokenizer(small_cfg()), tmp_path)
    other = tmp_path / "other"
    save_tokenizer(model, other)
    (other / "model.safetensors").replace(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="tokenizer id mismatch"):
        load_tokenizer(tmp_path)

    with pytest.raises(ValueError, match="not a saved tokenizer"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 16, 32, 32),
        (1, 3, 8, 64, 64),
        (1, 3, 8, 32, 24),
        (1, 1, 8, 32, 32),
        (3, 8, 32, 32),
        (1, 3, 7, 32, 32),
    ],
)
def test_mismatched_input_shape_raises(shape: tuple[int, ...]) -> None:
    model = Tokenizer(small_cfg())
    video = torch.rand(*shape)
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 32, 32\)"):
        model(video)
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 32, 32\)"):
        model.encode(video)


def test_channel_mult_length_is_checked() -> None:
    cfg = small_cfg(channel_mult=[1, 2, 4])  # patch_size 8 needs 4 levels
    with pytest.raises(ConfigError, match="channel_mult"):
        cfg.validate()
    with pytest.raises(ConfigError, match="channel_mult"):
        Tokenizer(cfg)
