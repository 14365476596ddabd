import math

import pytest
import torch

from lvmae.config import MaskingConfig
from lvmae.masking import (
    decoder_count,
    frame_mask,
    indices_of,
    num_visible,
    plan_masks,
    random_mask,
    running_cell_pattern,
    select_decoder_tokens,
    tube_mask,
)

GRID = (8, 14, 14)
N = math.prod(GRID)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9, 0.95])
def test_tube_mask_exact_count_and_identical_across_time(ratio):
    mask = tube_mask(4, GRID, ratio, gen())
    per_step = mask.reshape(4, GRID[0], -1)
    assert (per_step == per_step[:, :1]).all(), "a tube mask must be the same at every time step"
    assert (mask.sum(1) == GRID[0] * round(ratio * 14 * 14)).all()
    assert not torch.equal(per_step[0, 0], per_step[1, 0]), "samples should get different masks"


def test_random_and_frame_mask_counts():
    assert (random_mask(3, GRID, 0.9, gen()).sum(1) == round(0.9 * N)).all()
    fm = frame_mask(3, GRID, 0.5, gen()).reshape(3, GRID[0], -1)
    assert (fm.all(-1) | (~fm).all(-1)).all(), "frame masking hides whole time steps"
    assert (fm.all(-1).sum(1) == 4).all()


@pytest.mark.parametrize("kind", ["tube", "random", "frame"])
def test_visible_count_matches_config_arithmetic(kind):
    cfg = MaskingConfig(encoder=kind, encoder_ratio=0.75, decoder="all")
    plan = plan_masks(cfg, 2, GRID, gen())
    assert plan.num_visible == num_visible(GRID, kind, 0.75)
    assert (~plan.mask).sum(1).tolist() == [plan.num_visible] * 2
    # ids_visible are exactly the unmasked tokens, ascending.
    assert not plan.mask.gather(1, plan.ids_visible).any()
    assert (plan.ids_visible.diff(dim=1) > 0).all()


@pytest.mark.parametrize("strategy", ["random", "running_cell", "adaptive"])
@pytest.mark.parametrize("budget", [0.05, 0.15, 0.5])
def test_decoder_selection_exact_count_and_subset_of_mask(strategy, budget):
    cfg = MaskingConfig(encoder="tube", encoder_ratio=0.9, decoder=strategy, decoder_budget=budget)
    priority = torch.rand(3, N, generator=gen(1))
    plan = plan_masks(cfg, 3, GRID, gen(), priority=priority)
    expected = min(round(budget * N), N - plan.num_visible)
    assert plan.num_selected == expected
    assert (plan.selected.sum(1) == expected).all()
    assert not (plan.selected & ~plan.mask).any(), "the decoder only reconstructs encoder-masked tokens"
    assert plan.selected.gather(1, plan.ids_selected).all()
    assert torch.equal(plan.loss_weight(), torch.ones(3, expected))


def test_all_strategy_selects_every_masked_token():
    plan = plan_masks(MaskingConfig(decoder="all"), 2, GRID, gen())
    assert torch.equal(plan.selected, plan.mask)
    assert plan.num_selected == N - plan.num_visible


def test_adaptive_selection_is_topk_of_priority_among_masked():
    mask = tube_mask(4, GRID, 0.9, gen())
    priority = torch.rand(4, N, generator=gen(7))
    k = decoder_count(N, int(mask[0].sum()), "adaptive", 0.15)
    selected = select_decoder_tokens("adaptive", mask, GRID, 0.15, gen(), priority)
    for b in range(4):
        masked_ids = mask[b].nonzero().squeeze(1)
        top = masked_ids[priority[b, masked_ids].topk(k).indices]
        assert set(selected[b].nonzero().squeeze(1).tolist()) == set(top.tolist())
        # Everything selected outranks everything masked but not selected.
        rest = mask[b] & ~selected[b]
        assert priority[b][selected[b]].min() >= priority[b][rest].max()


def test_adaptive_needs_priority():
    with pytest.raises(ValueError, match="priority"):
        plan_masks(MaskingConfig(decoder="adaptive"), 1, GRID, gen())


def test_running_cell_pattern_rolls_and_covers_every_slot():
    grid = (8, 4, 6)
    for keep in (1, 2, 3):
        pat = running_cell_pattern(grid, 2, keep).reshape(grid)
        # keep of every 2x2 cell's 4 slots at each step.
        cells = pat.reshape(8, 2, 2, 3, 2).permute(0, 1, 3, 2, 4).reshape(8, 6, 4)
        assert (cells.sum(-1) == keep).all()
        # Consecutive steps differ (the cell runs) and the pattern repeats every 4 steps.
        assert not torch.equal(pat[0], pat[1])
        assert torch.equal(pat[0], pat[4])
        # Over one period, every position is kept exactly `keep` times.
        assert (pat[:4].sum(0) == keep).all()
    # A phase shift is the same pattern, one step ahead.
    shifted = running_cell_pattern(grid, 2, 1, phase=1).reshape(grid)
    assert torch.equal(shifted[:-1], running_cell_pattern(grid, 2, 1).reshape(grid)[1:])


def test_running_cell_selection_prefers_pattern_tokens():
    mask = tube_mask(2, GRID, 0.9, gen())
    selected = select_decoder_tokens("running_cell", mask, GRID, 0.15, gen(3))
    patterns = [running_cell_pattern(GRID, 2, 1, ph) for ph in range(4)]
    for b in range(2):
        # With keep=1 of 4 slots, 22.5% of tokens are candidates: enough for a 15% budget, so every
        # selected token lies on one of the running-cell patterns (the one with this sample's phase).
        assert any(not (selected[b] & ~pat).any() for pat in patterns)


def test_masks_are_deterministic_under_a_seed():
    cfg = MaskingConfig(decoder="running_cell")
    a = plan_masks(cfg, 2, GRID, gen(42))
    b = plan_masks(cfg, 2, GRID, gen(42))
    c = plan_masks(cfg, 2, GRID, gen(43))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.selected, b.selected)
    assert not torch.equal(a.mask, c.mask)


def test_indices_of_is_ascending():
    flags = torch.tensor([[True, False, True, True, False]])
    assert indices_of(flags, 3).tolist() == [[0, 2, 3]]
