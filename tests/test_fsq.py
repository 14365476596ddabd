import pytest
import torch

from lvmae.fsq import FSQ, LFQ, codes_to_digits, digits_to_codes


def test_digits_round_trip_over_the_whole_codebook():
    levels = [8, 5, 5, 3]
    codes = torch.arange(8 * 5 * 5 * 3)
    digits = codes_to_digits(codes, levels)
    assert (digits < torch.tensor(levels)).all() and (digits >= 0).all()
    assert torch.equal(digits_to_codes(digits, levels), codes)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 6, 2], [2, 2, 2, 2]])
def test_fsq_uses_exactly_levels_values_per_channel(levels):
    fsq = FSQ(levels)
    z = torch.randn(20000, len(levels)) * 4
    q = fsq(z)
    for i, lv in enumerate(levels):
        assert q.z_q[:, i].unique().numel() == lv
    assert q.codes.min() >= 0 and q.codes.max() < fsq.codebook_size
    assert torch.allclose(fsq.codes_to_latent(q.codes), q.z_q)


def test_fsq_straight_through_gradient():
    z = torch.randn(16, 3, requires_grad=True)
    FSQ([5, 5, 5])(z).z_q.sum().backward()
    assert z.grad is not None and (z.grad.abs() > 0).all()


def test_lfq_codes_and_entropy_loss():
    lfq = LFQ(bits=6, entropy_weight=0.1).train()
    z = torch.randn(500, 6, requires_grad=True)
    q = lfq(z)
    assert set(q.z_q.unique().tolist()) == {-1.0, 1.0}
    assert torch.allclose(lfq.codes_to_latent(q.codes), q.z_q)
    q.aux_loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
