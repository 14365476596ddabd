"""model.masking.priority: what the adaptive decoder mask ranks tokens by (lvmae.priority)."""

import pytest
import torch

from lvmae.config import ConfigError
from lvmae.diagnostics import lift
from lvmae.priority import clip_ranks, token_priority
from train.config import load_train_config
from train.tasks import MAETask

# A tiny MAE on 8-frame 32 px clips, 2 x 8 x 8 tubelets: a 4 x 4 x 4 token grid.
MODEL = [
    "model.preset=tiny",
    "model.video.img_size=32",
    "model.video.patch_size=8",
    "model.video.num_frames=8",
]


def moving_square(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> video (B, 3, 8, 32, 32) in [0, 1]: a still noise background and a bright 8 px square moving
    right by 4 px a frame; the tokens it changes (B, 4, 4, 4) bool."""
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(batch, 3, 1, 32, 32, generator=g).expand(-1, -1, 8, -1, -1).clone() * 0.5
    for t in range(8):
        video[:, :, t, 8:16, t * 3 : t * 3 + 8] = 1.0
    changed = torch.zeros(batch, 8, 32, 32, dtype=torch.bool)
    changed[:, 1:] = (video[:, :, 1:] != video[:, :, :-1]).any(1)
    region = changed.reshape(batch, 4, 2, 4, 8, 4, 8).float().mean((2, 4, 6)) >= 0.05
    return video, region


def test_clip_ranks_order_each_clip_on_its_own():
    score = torch.tensor([[3.0, -1.0, 10.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(clip_ranks(score), torch.tensor([[2 / 3, 0.0, 1.0, 1 / 3], [0.0, 1 / 3, 2 / 3, 1.0]]))
    assert clip_ranks(score.reshape(2, 2, 2)).shape == (2, 2, 2)


def test_frame_difference_ranks_the_moving_square_first():
    video, region = moving_square()
    priority = token_priority("frame_diff", None, video, tubelet=2, patch=8)
    assert priority.shape == region.shape
    # The changing tokens are 9 of 64 here: the top 15% by frame difference are all on them.
    assert lift(priority, region) == pytest.approx(1 / region.float().mean().item())
    assert lift(torch.rand(region.shape, generator=torch.Generator().manual_seed(0)), region) < 2


def test_combined_is_the_mean_of_the_two_ranks():
    video, region = moving_square()
    learned = torch.randn(region.shape, generator=torch.Generator().manual_seed(1))
    combined = token_priority("combined", learned.reshape(2, -1), video, tubelet=2, patch=8)
    fd = token_priority("frame_diff", None, video, tubelet=2, patch=8)
    assert torch.allclose(combined, (clip_ranks(learned) + clip_ranks(fd)) / 2)
    # A token the learned score and the frame difference both put first is first.
    learned.reshape(2, -1)[:, 0] = -100
    top = fd.reshape(2, -1).argmax(1)
    learned.reshape(2, -1)[torch.arange(2), top] = 100
    combined = token_priority("combined", learned, video, tubelet=2, patch=8)
    assert torch.equal(combined.reshape(2, -1).argmax(1), top)


def test_learned_needs_the_tokenizers_scores():
    video, _ = moving_square()
    with pytest.raises(ValueError, match=r"data\.tokens"):
        token_priority("learned", None, video, tubelet=2, patch=8)


def test_frame_difference_needs_no_token_set_and_an_unknown_source_is_refused():
    pixels = [*MODEL, "model.target.kind=pixels", "data.url=/x"]
    cfg = load_train_config([], [*pixels, "model.masking.priority=frame_diff"])
    assert MAETask(cfg).tokens is None
    for source in ("learned", "combined"):
        with pytest.raises(ConfigError, match=r"data\.tokens"):
            load_train_config([], [*pixels, f"model.masking.priority={source}"])
    with pytest.raises(ConfigError, match=r"model\.masking\.priority"):
        load_train_config([], [*pixels, "model.masking.priority=motion", "data.tokens=t"])


def test_an_adaptive_step_on_frame_difference_rebuilds_the_moving_square():
    """MAETask.loss with priority=frame_diff: the decoder's 15% go to the tokens that change."""
    cfg = load_train_config(
        [], [*MODEL, "model.target.kind=pixels", "data.url=/x", "model.masking.priority=frame_diff"]
    )
    task = MAETask(cfg)
    model = task.build_model()
    video, region = moving_square(batch=4)
    seen = []
    plan = model.plan
    model.plan = lambda *a, **k: seen.append(plan(*a, **k)) or seen[-1]
    loss = task.loss(model, {"video": video}, video, torch.Generator().manual_seed(0), step=0)
    assert torch.isfinite(loss)
    selected = seen[0].selected.reshape(region.shape)
    # Every selected token is masked and, with 9 changing tokens of 64 and 9 selected, nearly all of them
    # change (a changing token the encoder sees cannot be selected; an unchanged one fills its place).
    on_change = (selected & region).sum() / selected.sum()
    assert on_change > 0.6, on_change
