import pytest
import torch

from lvmae.pos_embed import sincos_3d
from lvmae.tubelets import gather_tubelets, normalize_tubelets, patchify, pixel_targets, unpatchify


@pytest.mark.parametrize(
    ("frames", "size", "t", "p"), [(16, 32, 2, 16), (8, 48, 2, 8), (6, 12, 3, 4), (4, 16, 1, 16)]
)
def test_patchify_round_trip(frames, size, t, p):
    video = torch.randn(2, 3, frames, size, size)
    tokens = patchify(video, t, p)
    grid = (frames // t, size // p, size // p)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], t * p * p * 3)
    assert torch.equal(unpatchify(tokens, grid, t, p), video)


def test_patchify_token_order_and_content():
    # Token k must hold exactly the pixels of tubelet (k // (H'W'), (k // W') % H', k % W').
    t, p = 2, 4
    video = torch.arange(3 * 8 * 12 * 16, dtype=torch.float32).reshape(1, 3, 8, 12, 16)
    tokens = patchify(video, t, p)
    gh, gw = 12 // p, 16 // p
    for k in (0, 5, 17, tokens.shape[1] - 1):
        ti, hi, wi = k // (gh * gw), (k // gw) % gh, k % gw
        block = video[0, :, ti * t : (ti + 1) * t, hi * p : (hi + 1) * p, wi * p : (wi + 1) * p]
        assert torch.equal(tokens[0, k], block.permute(1, 2, 3, 0).reshape(-1))


def test_normalized_targets_have_zero_mean_unit_std_per_channel():
    video = torch.rand(1, 3, 4, 32, 32) * 5 + 2
    target = pixel_targets(video, 2, 16, norm=True).reshape(1, -1, 2 * 16 * 16, 3)
    assert torch.allclose(target.mean(dim=2), torch.zeros(1, target.shape[1], 3), atol=1e-5)
    assert torch.allclose(target.std(dim=2), torch.ones(1, target.shape[1], 3), atol=1e-3)


def test_normalized_targets_ignore_input_normalization():
    # Per-channel affine maps (dataset mean/std normalization) leave VideoMAE's targets unchanged.
    video = torch.rand(1, 3, 4, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    a = normalize_tubelets(patchify(video, 2, 16), 2, 16, eps=0)
    b = normalize_tubelets(patchify((video - mean) / std, 2, 16), 2, 16, eps=0)
    assert torch.allclose(a, b, atol=1e-4)


def test_sincos_3d_shape_and_uniqueness():
    grid = (8, 14, 14)
    pos = sincos_3d(768, grid)
    assert pos.shape == (8 * 14 * 14, 768)
    assert torch.isfinite(pos).all()
    # Every position gets a distinct embedding.
    assert torch.cdist(pos, pos).add(torch.eye(pos.shape[0]) * 1e3).min() > 1e-3
    with pytest.raises(ValueError):
        sincos_3d(97, grid)


def test_gather_tubelets_equals_patchify_then_gather():
    video = torch.randn(2, 3, 8, 32, 48)
    ids = torch.stack([torch.randperm(4 * 2 * 3)[:7] for _ in range(2)])
    full = patchify(video, 2, 16)
    expected = full.gather(1, ids[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.equal(gather_tubelets(video, ids, 2, 16), expected)


def test_embedding_only_the_visible_tubelets_matches_the_convolution():
    from lvmae.config import VideoSpec
    from lvmae.mae import TubeletEmbed

    embed = TubeletEmbed(VideoSpec(num_frames=8, img_size=32, patch_size=16), 24)
    video = torch.randn(2, 3, 8, 32, 32)
    ids = torch.tensor([[0, 5, 9], [2, 3, 15]])
    full = embed(video)
    assert torch.allclose(embed(video, ids), full.gather(1, ids[..., None].expand(-1, -1, 24)), atol=1e-5)
