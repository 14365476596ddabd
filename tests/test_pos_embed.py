"""model.pos_embed (VideoMAE's 1D table or the separable 3D one), model.input_norm, and old saved configs
(written before those options) read back as they were trained."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

from lvmae.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConfigError,
    MAEConfig,
    load_config,
    load_saved_model_config,
    to_dict,
    to_yaml,
)
from lvmae.heads import check_encoder_state, encoder_config, encoder_for
from lvmae.losses import mae_loss
from lvmae.mae import MaskedVideoAutoencoder, VideoViT
from lvmae.pos_embed import position_table, sincos_3d, videomae_1d
from lvmae.presets import preset_config
from lvmae.weights import load_mae, save_mae
from train.config import load_saved_train_config
from train.pretrained import load_pretrained


def tiny(frames: int = 8, **model) -> MAEConfig:
    cfg = preset_config("tiny", num_frames=frames, img_size=32, patch_size=8)
    cfg.masking.decoder, cfg.target.kind = "random", "pixels"
    for key, value in model.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.parametrize(("num_tokens", "dim"), [(1, 1), (7, 3), (64, 48), (1568, 768), (392, 1024)])
def test_videomae_1d_is_transformers_table_bit_for_bit(num_tokens, dim):
    ours = videomae_1d(dim, num_tokens)
    theirs = get_sinusoid_encoding_table(num_tokens, dim)[0]
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_position_table_kinds_and_defaults():
    grid = (4, 4, 4)
    assert torch.equal(position_table("sincos_3d", 48, grid), sincos_3d(48, grid))
    assert torch.equal(position_table("videomae_1d", 48, grid), videomae_1d(48, 64))
    with pytest.raises(ValueError, match="unknown position embedding"):
        position_table("learned", 48, grid)
    assert MAEConfig().pos_embed == "videomae_1d" and MAEConfig().input_norm == "none"
    model = MaskedVideoAutoencoder(tiny())
    assert torch.equal(model.encoder.pos_embed[0], videomae_1d(model.encoder.dim, 64))
    assert torch.equal(model.decoder_pos_embed[0], videomae_1d(model.cfg.decoder.embed_dim, 64))
    old = MaskedVideoAutoencoder(tiny(pos_embed="sincos_3d"))
    assert torch.equal(old.encoder.pos_embed[0], sincos_3d(old.encoder.dim, (4, 4, 4)))
    assert not any("pos_embed" in k or "input_" in k for k in model.state_dict())  # fixed buffers


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("pos_embed=learned", "pos_embed"),
        ("input_norm=kinetics", "input_norm"),
        ("input_norm=imagenet video.in_chans=1", "input_norm"),
    ],
)
def test_bad_options_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^model\.{key}: "):
        load_config(MAEConfig, [], ["preset=tiny", *override.split()])


def test_encoder_for_another_grid_recomputes_the_1d_table():
    model = MaskedVideoAutoencoder(tiny())
    longer = encoder_for(model.cfg, model.state_dict(), num_frames=16)
    assert torch.equal(longer.pos_embed[0], videomae_1d(longer.dim, 8 * 4 * 4))
    # The first frames' tokens keep their codes: the flattened index only grows.
    assert torch.equal(longer.pos_embed[0, :64], model.encoder.pos_embed[0])
    check_encoder_state(encoder_config(model.cfg, num_frames=16), model.state_dict(), "test")


def old_style_export(tmp_path, model: MaskedVideoAutoencoder):
    """An export as written before pos_embed and input_norm existed: its config.yaml lacks both keys."""
    d = save_mae(model.state_dict(), model.cfg, tmp_path / "export")
    raw = to_dict(model.cfg)
    del raw["pos_embed"], raw["input_norm"]
    (d / "config.yaml").write_text(OmegaConf.to_yaml(raw))
    return d


def test_old_saved_configs_load_as_sincos_3d_without_input_norm(tmp_path):
    torch.manual_seed(0)
    model = MaskedVideoAutoencoder(tiny(pos_embed="sincos_3d"))
    d = old_style_export(tmp_path, model)
    assert "pos_embed" not in (d / "config.yaml").read_text()
    cfg = load_saved_model_config(d / "config.yaml")
    assert (cfg.pos_embed, cfg.input_norm) == ("sincos_3d", "none")
    loaded = load_mae(d)
    assert torch.equal(loaded.encoder.pos_embed, model.encoder.pos_embed)
    assert torch.equal(loaded.decoder_pos_embed, model.decoder_pos_embed)
    src_cfg, _, what = load_pretrained(str(d))
    assert src_cfg.pos_embed == "sincos_3d" and what.startswith("export")
    # A checkpoint's saved training config: its model section is read the same way.
    train_yaml = {
        "model": OmegaConf.to_container(OmegaConf.load(d / "config.yaml")),
        "data": {"url": "/data", "tokens": None},
    }
    (tmp_path / "run.yaml").write_text(OmegaConf.to_yaml(train_yaml))
    assert load_saved_train_config(tmp_path / "run.yaml").model_config().pos_embed == "sincos_3d"
    # Saved configs that have the keys keep them; recipes without them get today's defaults.
    new = tiny(input_norm="imagenet")
    (tmp_path / "new.yaml").write_text(to_yaml(new))
    assert load_saved_model_config(tmp_path / "new.yaml") == new
    assert load_config(MAEConfig, [{"preset": "tiny"}]).pos_embed == "videomae_1d"


def test_imagenet_input_norm_is_the_formula_inside_the_encoder():
    torch.manual_seed(0)
    plain = VideoViT(tiny())
    normed = VideoViT(tiny(input_norm="imagenet"))
    normed.load_state_dict(plain.state_dict(), strict=True)  # the stats are not weights
    x = torch.rand(2, 3, 8, 32, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    expected = (x - mean) / std
    assert torch.allclose(normed.normalize(x), expected, atol=1e-6)
    assert torch.equal(plain.normalize(x), x)
    ids = torch.tensor([[0, 5, 17, 63], [1, 2, 40, 41]])
    with torch.no_grad():
        assert torch.allclose(normed(x), plain(expected), atol=1e-5)
        assert torch.allclose(normed(x, ids), plain(expected, ids), atol=1e-5)


def test_mae_with_imagenet_norm_trains_on_raw_pixel_targets():
    torch.manual_seed(0)
    model = MaskedVideoAutoencoder(tiny(input_norm="imagenet"))
    video = torch.rand(2, 3, 8, 32, 32)
    out = model(video, generator=torch.Generator().manual_seed(0))
    loss = mae_loss(model.cfg, out, video=video)
    loss.backward()
    assert torch.isfinite(loss) and out.pred.shape[-1] == 2 * 8 * 8 * 3
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_resuming_an_older_checkpoint_under_the_new_default_is_refused(tmp_path):
    """A checkpoint saved before model.pos_embed existed was trained with the 3-D table: resuming it with
    today's default (videomae_1d) would silently change every position; it is refused with the fix."""
    from omegaconf import OmegaConf

    from train.checkpoint import CheckpointError
    from train.config import load_train_config
    from train.resume import check_resumed_model

    old = OmegaConf.to_container(OmegaConf.structured(load_train_config([], ["data.url=x", "data.tokens=t"])))
    for key in ("pos_embed", "input_norm"):
        del old["model"][key]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    today = load_train_config([], ["data.url=x", "data.tokens=t"])
    with pytest.raises(
        CheckpointError, match=r"trained with model.pos_embed=sincos_3d.*pass model.pos_embed=sincos_3d"
    ):
        check_resumed_model(tmp_path / "config.yaml", today, "step-8")
    check_resumed_model(
        tmp_path / "config.yaml",
        load_train_config([], ["data.url=x", "data.tokens=t", "model.pos_embed=sincos_3d"]),
        "step-8",
    )


def test_resuming_an_older_fine_tune_under_the_new_pooling_is_refused(tmp_path):
    """A fine-tune saved before finetune.pooling existed pooled normalised tokens (norm_mean)."""
    from omegaconf import OmegaConf

    from evals.finetune import load_finetune_config
    from train.checkpoint import CheckpointError
    from train.resume import check_resumed_model

    args = ["data.url=x", "finetune.init_from=y"]
    old = OmegaConf.to_container(OmegaConf.structured(load_finetune_config([], args)))
    del old["finetune"]["pooling"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    with pytest.raises(CheckpointError, match=r"finetune.pooling=norm_mean.*pass finetune.pooling=norm_mean"):
        check_resumed_model(tmp_path / "config.yaml", load_finetune_config([], args), "step-8")
    check_resumed_model(
        tmp_path / "config.yaml", load_finetune_config([], [*args, "finetune.pooling=norm_mean"]), "step-8"
    )
