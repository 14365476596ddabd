import pytest
import torch
import torch.nn.functional as F

from lvmae.config import MAEConfig, MaskingConfig, TargetConfig
from lvmae.fsq import codes_to_digits
from lvmae.losses import (
    mae_loss,
    pixel_loss,
    predicted_codes,
    token_factorized_loss,
    token_softmax_loss,
)
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.presets import preset_config
from lvmae.tubelets import patchify, unpatchify


def tiny_model(kind="pixels", token_loss="factorized"):
    torch.manual_seed(0)
    cfg = preset_config("tiny", num_frames=8, img_size=32, patch_size=8)
    cfg.masking = MaskingConfig(encoder="tube", encoder_ratio=0.75, decoder="random", decoder_budget=0.25)
    cfg.target.kind = kind
    cfg.target.token_loss = token_loss
    cfg.target.fsq_levels = [8, 5, 5]
    return MaskedVideoAutoencoder(cfg).eval()


def test_pixel_loss_ignores_tokens_outside_the_selected_set():
    model = tiny_model()
    video = torch.rand(2, 3, 8, 32, 32)
    out = model(video, generator=torch.Generator().manual_seed(0))
    base = mae_loss(model.cfg, out, video=video)

    grid, plan = model.grid, out.plan
    tokens = patchify(video, 2, 8)
    # Change every tubelet that is NOT selected (visible ones and masked-but-unselected ones): the target
    # of the loss must not move. (The prediction is held fixed: only the target side is under test.)
    changed = tokens.clone()
    changed[~plan.selected] = torch.rand_like(changed[~plan.selected])
    assert mae_loss(model.cfg, out, video=unpatchify(changed, grid, 2, 8)).item() == pytest.approx(
        base.item(), abs=1e-6
    )
    # Change one selected tubelet: it must.
    b, k = 0, plan.ids_selected[0, 0]
    changed = tokens.clone()
    changed[b, k] = torch.rand_like(changed[b, k])
    assert mae_loss(model.cfg, out, video=unpatchify(changed, grid, 2, 8)).item() != pytest.approx(
        base.item(), abs=1e-6
    )


def test_token_loss_ignores_codes_outside_the_selected_set():
    model = tiny_model("tokens")
    video = torch.rand(2, 3, 8, 32, 32)
    out = model(video, generator=torch.Generator().manual_seed(0))
    codes = torch.randint(0, 200, (2, 4, 4, 4))
    base = mae_loss(model.cfg, out, codes=codes)
    flat = codes.reshape(2, -1).clone()
    flat[~out.plan.selected] = torch.randint(0, 200, (int((~out.plan.selected).sum()),))
    assert mae_loss(model.cfg, out, codes=flat).item() == pytest.approx(base.item(), abs=1e-6)
    flat[0, out.plan.ids_selected[0, 0]] = (flat[0, out.plan.ids_selected[0, 0]] + 1) % 200
    assert mae_loss(model.cfg, out, codes=flat).item() != pytest.approx(base.item(), abs=1e-6)


def test_weight_zero_tokens_do_not_count():
    pred, target = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    weight = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    garbage = target.clone()
    garbage[:, 2:] = 1e6
    assert pixel_loss(pred, target, weight) == pixel_loss(pred, garbage, weight)
    assert pixel_loss(pred, target, weight) == pytest.approx(F.mse_loss(pred[:, :2], target[:, :2]).item())


def test_softmax_loss_is_cross_entropy_over_the_codebook():
    logits, codes = torch.randn(2, 5, 200), torch.randint(0, 200, (2, 5))
    expected = F.cross_entropy(logits.reshape(-1, 200), codes.reshape(-1))
    assert token_softmax_loss(logits, codes, torch.ones(2, 5)) == pytest.approx(expected.item(), rel=1e-5)


def test_factorized_loss_is_mean_of_per_digit_cross_entropies():
    levels = [8, 5, 5]
    logits, codes = torch.randn(2, 5, 18), torch.randint(0, 200, (2, 5))
    digits = codes_to_digits(codes, levels)
    parts = logits.split(levels, dim=-1)
    expected = (
        sum(F.cross_entropy(parts[i].reshape(-1, levels[i]), digits[..., i].reshape(-1)) for i in range(3))
        / 3
    )
    assert token_factorized_loss(logits, codes, levels, torch.ones(2, 5)) == pytest.approx(
        expected.item(), rel=1e-5
    )
    # Confident, correct logits give a loss near zero.
    perfect = torch.cat([F.one_hot(digits[..., i], lv).float() * 50 for i, lv in enumerate(levels)], dim=-1)
    assert token_factorized_loss(perfect, codes, levels, torch.ones(2, 5)) < 1e-6


def test_missing_targets_are_clear_errors():
    model = tiny_model("tokens")
    out = model(torch.rand(1, 3, 8, 32, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="codes"):
        mae_loss(model.cfg, out, video=torch.rand(1, 3, 8, 32, 32))


def test_predicted_codes_are_the_argmax_of_each_head():
    levels = [8, 5, 5]
    cfg = MAEConfig(preset="tiny", target=TargetConfig(kind="tokens", fsq_levels=levels))
    codes = torch.randint(0, 200, (2, 7))
    digits = codes_to_digits(codes, levels)  # (2, 7, 3)
    # Factorized: one-hot logits at each digit give back exactly the codes.
    logits = torch.cat([F.one_hot(digits[..., i], lv).float() for i, lv in enumerate(levels)], dim=-1)
    assert torch.equal(predicted_codes(cfg, logits), codes)
    cfg.target.token_loss = "softmax"
    assert torch.equal(predicted_codes(cfg, F.one_hot(codes, 200).float()), codes)
    with pytest.raises(ValueError, match="token targets"):
        predicted_codes(MAEConfig(preset="tiny"), logits)
