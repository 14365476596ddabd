import pytest

from lvmae.config import ConfigError, MAEConfig, load_config, to_yaml
from lvmae.tokenizer_config import TokenizerConfig, check_tokenizer_matches


def test_presets_fill_sizes_and_explicit_values_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: large\nvideo: {num_frames: 128}\nencoder: {depth: 6}\n")
    cfg = load_config(MAEConfig, [recipe], ["masking.decoder_budget=0.2"]).resolved()
    assert (cfg.encoder.embed_dim, cfg.encoder.depth, cfg.encoder.num_heads) == (1024, 6, 16)
    assert (cfg.decoder.embed_dim, cfg.decoder.depth) == (512, 4)
    assert cfg.video.grid == (64, 14, 14) and cfg.video.num_tokens == 12544
    assert cfg.masking.decoder_budget == 0.2


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("encoder.dpeth=3", "encoder.dpeth"),  # unknown key
        ("video.num_frames=lots", "video.num_frames"),  # wrong type
        ("video.num_frames=15", "video.num_frames"),  # not divisible by the tubelet
        ("masking.encoder_ratio=1.5", "masking.encoder_ratio"),
        ("masking.decoder=best", "masking.decoder"),
        ("target.kind=latents", "target.kind"),
        ("preset=giant", "preset"),
        ("encoder.num_heads=5", "encoder.embed_dim"),  # 768 not divisible by 5
    ],
)
def test_bad_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(MAEConfig, [], [override])


def test_tokenizer_grid_must_match_the_mae_grid():
    model = MAEConfig(preset="tiny")
    tok = TokenizerConfig()
    check_tokenizer_matches(model, tok)
    tok.video.patch_size = 8
    with pytest.raises(ConfigError, match="latent grid"):
        check_tokenizer_matches(model, tok)
    tok.video.patch_size = 16
    model.target.kind = "tokens"
    model.target.fsq_levels = [8, 8, 8]
    with pytest.raises(ConfigError, match="fsq_levels"):
        check_tokenizer_matches(model, tok)


def test_saved_yaml_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(MAEConfig, [], ["preset=small", "masking.decoder=running_cell"]).resolved()
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(MAEConfig, [path]) == cfg
