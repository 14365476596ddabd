"""Tokenizer: latent grid = MAE token grid, each latent and score centred on its own tubelet, time edges
that are not second-class, token selection with exact counts, scorer gradients, overfitting a real clip,
and a safetensors save/load whose id catches any change to config or weights."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from ingest.frames import load_clip
from lvmae.config import ConfigError, VideoSpec
from lvmae.tokenizer import (
    Tokenizer,
    held_latents,
    load_tokenizer,
    save_tokenizer,
    tokenizer_id,
    tokenizer_loss,
)
from lvmae.tokenizer_config import TokenizerConfig


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
    # no random context tokens here: they would make the count of kept tokens random (tested below)
    cfg = small_cfg(**geometry, quantizer=quantizer, fsq_levels=[8, 5, 5], lfq_bits=6, context_ratio=0.0)
    model = Tokenizer(cfg)
    t, p = geometry["tubelet_size"], geometry["patch_size"]
    grid = (geometry["num_frames"] // t, geometry["img_size"] // p, geometry["img_size"] // p)
    video = torch.rand(2, 3, geometry["num_frames"], geometry["img_size"], geometry["img_size"])

    out = model(video, generator=torch.Generator().manual_seed(0))
    assert out.recon.shape == video.shape
    assert out.codes.shape == out.priority.shape == out.keep.shape == (2, *grid)
    assert out.codes.dtype == torch.int64 and out.priority.dtype == torch.float32
    assert out.codes.min() >= 0 and out.codes.max() < cfg.codebook_size
    # k tokens chosen among the time steps after the first, which the `hold` context always keeps
    k = min(max(1, round(cfg.keep_ratio * math.prod(grid))), math.prod(grid[1:]) * (grid[0] - 1))
    kept = k + grid[1] * grid[2]
    assert (out.keep[:, 0] == 1).all()
    torch.testing.assert_close(out.keep.flatten(1).sum(1), torch.full((2,), float(kept)))  # soft, exact
    assert torch.isfinite(out.recon).all() and torch.isfinite(out.aux_loss)

    codes, priority = model.encode(video)
    assert codes.shape == priority.shape == (2, *grid)
    assert torch.equal(codes, out.codes)
    assert torch.equal(priority, out.priority.detach())
    assert priority.dtype == torch.float32 and not priority.requires_grad
    assert model.training  # encode() restores the mode it found
    model.eval()
    hard = model.select(priority)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and (hard.flatten(1).sum(1) == kept).all()
    later = priority[:, 1:].flatten(1)
    if k < later.shape[1]:  # the hard choice is the top k of the later time steps' priorities
        assert hard[:, 1:].flatten(1)[0][later[0].topk(k).indices].all()
    assert model.decode_codes(codes, priority).shape == video.shape


@pytest.mark.parametrize("causal", [False, True])
def test_latents_and_scores_are_centred_on_their_tubelet(causal: bool) -> None:
    # Where does a token look? The centre of mass of |d output / d input| over the clip, averaged over a
    # few random initialisations, for a token in the middle of a large grid (borders out of reach). A
    # stack of 3-wide stride-2 convs puts it half a patch before the tubelet's centre (3.5 of 4 px here);
    # centred kernels put it on it. Causal convs look back in time, so only space is checked for them.
    v = VideoSpec(num_frames=24, img_size=96, patch_size=8, tubelet_size=2)
    cfg = TokenizerConfig(
        video=v,
        base_channels=8,
        channel_mult=[1, 1, 2, 2],
        num_groups=4,
        scorer_channels=8,
        causal=causal,
        norm="channel" if causal else "group",
    )
    token, centre = (6, 6, 6), torch.tensor([13.0, 52.0, 52.0])  # frames 12-13, rows and columns 48-55
    for name in ("encoder", "scorer"):
        weight = torch.zeros(24, 96, 96)
        for seed in range(3):
            torch.manual_seed(seed)
            module = getattr(Tokenizer(cfg), name)
            x = (torch.rand(1, 3, 24, 96, 96) * 2 - 1).requires_grad_()
            out = module(x)
            (out.sum(1) if out.ndim == 5 else out)[(0, *token)].backward()
            weight += x.grad.abs()[0].sum(0)  # type: ignore[union-attr]
        w = weight / weight.sum()
        pos = [torch.arange(n, dtype=torch.float32) + 0.5 for n in w.shape]
        com = torch.stack([(w.sum(dims) * p).sum() for dims, p in zip(((1, 2), (0, 2), (0, 1)), pos)])
        off = (com - centre).abs()
        assert off[1:].max() < 1.5, (
            f"{name}: looks at {com.tolist()}, its tubelet's centre is {centre.tolist()}"
        )
        if not causal:
            assert off[0] < 0.4, f"{name}: looks at frame {com[0]:.2f}, its tubelet's centre is 13.0"
        else:
            assert com[0] < 13.0, f"{name}: a causal token looks at frame {com[0]:.2f}, after its tubelet"


@pytest.mark.parametrize("norm", ["group", "channel"])
def test_a_change_in_one_tubelet_moves_its_own_score_most(norm: str) -> None:
    # Replace one tubelet of a clip with noise: averaged over initialisations and clips, that token's
    # score moves more than any other token's, by a margin (measured 3.6x, channel norm; 2.6x, group).
    # A plain stack of 3x3x3 convs on the token grid spreads a token over its 5x5x5 neighbourhood almost
    # evenly (own 0.020 of the total vs 0.021 for a neighbour), which this test fails.
    v = VideoSpec(num_frames=16, img_size=112, patch_size=16, tubelet_size=2)
    cfg = TokenizerConfig(
        video=v,
        base_channels=4,
        channel_mult=[1, 1, 2, 2, 4],
        num_groups=4,
        norm=norm,
        scorer_channels=16,
        fsq_levels=[8, 5, 5, 5],
    )
    tt, hh, ww = 4, 3, 3  # a token away from every border of the 8 x 7 x 7 grid
    moved = torch.zeros(5, 5, 5)
    for seed in range(4):
        torch.manual_seed(seed)
        scorer = Tokenizer(cfg).scorer.eval()
        clips = torch.rand(3, 3, 16, 112, 112) * 2 - 1
        changed = clips.clone()
        changed[:, :, 2 * tt : 2 * tt + 2, 16 * hh : 16 * hh + 16, 16 * ww : 16 * ww + 16] = (
            torch.rand(3, 3, 2, 16, 16) * 2 - 1
        )
        with torch.no_grad():
            delta = (scorer(changed) - scorer(clips)).abs().sum(0)
        moved += delta[tt - 2 : tt + 3, hh - 2 : hh + 3, ww - 2 : ww + 3]
    own = moved[2, 2, 2].item()
    others = moved.flatten()[torch.arange(125) != 62]
    assert own > 1.5 * others.max().item(), (own, others.max().item())


@pytest.mark.parametrize("causal", [False, True])
def test_a_still_clip_scores_alike_at_every_time_step(causal: bool) -> None:
    # With zero padding in time the first and last time steps see black frames beyond the clip and score
    # differently from the middle; with replicate (or causal replicate) padding a still clip is still.
    torch.manual_seed(0)
    still = torch.rand(1, 3, 1, 32, 32).expand(1, 3, 8, 32, 32).contiguous()
    model = Tokenizer(small_cfg(causal=causal, norm="channel" if causal else "group")).eval()
    codes, priority = model.encode(still)
    torch.testing.assert_close(priority, priority[:, :1].expand_as(priority), atol=1e-5, rtol=0)
    assert (codes == codes[:, :1]).all()

    torch.manual_seed(0)
    zeros = Tokenizer(
        small_cfg(temporal_padding="zeros", causal=causal, norm="channel" if causal else "group")
    ).eval()
    _, p0 = zeros.encode(still)
    assert (p0[:, 0] - p0[:, 3]).abs().max() > 1e-4  # the check above can fail


def test_causal_outputs_do_not_see_later_frames() -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_cfg(causal=True, norm="channel")).eval()
    video = torch.rand(1, 3, 8, 32, 32)
    later = video.clone()
    later[:, :, 6:] = torch.rand(1, 3, 2, 32, 32)  # the last tubelet (frames 6, 7) only
    with torch.no_grad():
        a, b = model.encode(video), model.encode(later)
        ra = model.decode_codes(a[0], a[1], keep_ratio=1.0)
        rb = model.decode_codes(b[0], b[1], keep_ratio=1.0)
    assert torch.equal(a[0][:, :3], b[0][:, :3]) and torch.equal(a[1][:, :3], b[1][:, :3])
    assert not torch.equal(a[1][:, 3], b[1][:, 3])
    assert torch.equal(ra[:, :, :6], rb[:, :, :6])
    # The held latents at a time step come from that step and before only.
    z = torch.randn(1, *model.grid, 3)
    z2 = z.clone()
    z2[:, 3] += 1
    keep = (torch.rand(1, *model.grid) < 0.5).float()
    assert torch.equal(held_latents(z, keep)[:, :3], held_latents(z2, keep)[:, :3])


def test_held_latents_hold_the_latest_kept_token() -> None:
    z = torch.arange(5.0).view(1, 5, 1, 1, 1).expand(1, 5, 1, 2, 1).clone()  # value = time step
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]).view(1, 5, 1, 1).expand(1, 5, 1, 2).clone()
    keep[0, 3, 0, 1] = 1.0  # the second position also keeps time step 3
    held = held_latents(z, keep)[0, :, 0, :, 0]  # (T', W')
    assert held[:, 0].tolist() == [0.0, 0.0, 2.0, 2.0, 2.0]
    assert held[:, 1].tolist() == [0.0, 0.0, 2.0, 3.0, 3.0]
    # A soft mask blends: half of step 1 and half of what was held.
    keep[0, 1] = 0.5
    assert held_latents(z, keep)[0, 1, 0, 0, 0].item() == 0.5


def test_causal_needs_a_norm_that_is_causal() -> None:
    with pytest.raises(ConfigError, match="norm"):
        small_cfg(causal=True, norm="group").validate()


def test_keep_ratio_warmup() -> None:
    cfg = small_cfg(keep_ratio=0.25, keep_warmup_steps=100)
    assert cfg.keep_ratio_at(0) == 1.0
    assert cfg.keep_ratio_at(50) == pytest.approx(0.625)
    assert cfg.keep_ratio_at(100) == cfg.keep_ratio_at(10**6) == cfg.keep_ratio_at(None) == 0.25
    assert small_cfg(keep_ratio=0.25).keep_ratio_at(0) == 0.25


@pytest.mark.parametrize("context", ["none", "temporal_mean", "keyframe", "hold"])
def test_decoder_contexts_and_context_tokens(context: str) -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_cfg(decoder_context=context, context_ratio=0.25))
    video = torch.rand(2, 3, 8, 32, 32)
    out = model(video, generator=torch.Generator().manual_seed(1))
    assert out.recon.shape == video.shape
    if context in ("keyframe", "hold"):
        assert (out.keep[:, 0] == 1).all()
    assert (out.keep.flatten(1).sum(1) >= round(0.25 * 64) - 1e-4).all()  # context tokens only add
    loss, _ = tokenizer_loss(out, video)
    loss.backward()
    assert model.scorer.head.weight.grad is not None and model.scorer.head.weight.grad.abs().sum() > 0
    # Outside training (evaluation, decode_codes, the token store) the selected tokens come alone.
    model.eval()
    first = 16 if context in ("keyframe", "hold") else 0
    assert (model.select(out.priority.detach()).flatten(1).sum(1) == round(0.25 * 64) + first).all()


def test_the_papers_selection_zeroes_dropped_tokens_and_perturbs_the_raw_logits() -> None:
    """configs/overlays/tokenizer_paper.yaml: dropped tokens reach the decoder as zeros (no mask token exists),
    every time step competes, and the perturbed top-k sees the logits unstandardised."""
    from omegaconf import OmegaConf

    recipe = Path(__file__).resolve().parents[1] / "configs" / "overlays" / "tokenizer_paper.yaml"
    paper = OmegaConf.to_container(OmegaConf.load(recipe).tokenizer)
    torch.manual_seed(0)
    model = Tokenizer(small_cfg(**paper))
    assert not hasattr(model, "mask_token") and "mask_token" not in model.state_dict()
    video = torch.rand(2, 3, 8, 32, 32)
    q, logits = model._quantize(video)
    none = torch.zeros(q.z_q.shape[:-1])
    zeros_in = model.decoder(torch.zeros_like(q.z_q).permute(0, 4, 1, 2, 3))
    assert torch.equal(model._decode(q.z_q, none, video.dtype), zeros_in)
    keep = model.select(logits.detach(), generator=torch.Generator().manual_seed(3))
    assert keep[:, 0].sum() < keep[:, 0].numel()  # the first time step is not kept for free
    # Raw logits: scaling them changes how much the fixed-sigma noise reorders them; standardised, not.
    flat = torch.randn(2, 64)
    draws = {}
    for std in (True, False):
        m = Tokenizer(small_cfg(**{**paper, "standardize_logits": std})).train()
        draws[std] = [
            m.select(x.view(2, 4, 4, 4), generator=torch.Generator().manual_seed(5))
            for x in (flat, 50 * flat)
        ]
    assert torch.allclose(*draws[True]) and not torch.allclose(*draws[False])
    loss, _ = tokenizer_loss(model(video, generator=torch.Generator().manual_seed(1)), video)
    loss.backward()
    assert model.scorer.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("topk", ["perturbed", "sigmoid"])
def test_gradients_reach_the_scorer(topk: str) -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_cfg(topk=topk))
    video = torch.rand(2, 3, 8, 32, 32)
    loss, parts = tokenizer_loss(model(video, generator=torch.Generator().manual_seed(0)), video)
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
        loss, parts = tokenizer_loss(model(clip, generator=torch.Generator().manual_seed(len(losses))), clip)
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

    # Saved before issue 8 (no "architecture"): one clear line instead of a state_dict mismatch.
    config.write_text(json.dumps({k: v for k, v in original.items() if k != "architecture"}))
    with pytest.raises(ValueError, match=r"architecture 1 .*train the tokenizer again"):
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


def test_priority_keeps_full_precision_under_bf16_autocast() -> None:
    # ingest tokens runs the tokenizer under bf16 autocast on CUDA; CPU autocast exercises the same path.
    # The scorer runs outside it, so its logits equal the float32 ones and close tokens do not tie.
    torch.manual_seed(0)
    model = Tokenizer(small_cfg()).eval()
    video = torch.rand(2, 3, 8, 32, 32)
    with torch.no_grad():
        _, full = model.encode(video)
        with torch.autocast("cpu", torch.bfloat16):
            codes, mixed = model.encode(video)
            encoded = model.encoder(video * 2 - 1)
    assert encoded.dtype == torch.bfloat16  # autocast was on for the encoder
    assert mixed.dtype == torch.float32 and torch.equal(mixed, full)
    assert codes.shape == full.shape
