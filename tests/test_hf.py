"""lvmae.hf and `lvmae export hf` / `lvmae import` against the real transformers VideoMAE (offline).

Every model here is random: the point is that both libraries compute the same function of the same
weights, so biases and norms are perturbed away from their zero / unit init (the key bias too, which the
export drops exactly).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_data import LVMAE, REPO, tiny_mae_args

from lvmae import hf, hf_import
from lvmae.errors import UserError
from lvmae.heads import VideoClassifier, encoder_for
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.presets import preset_config
from lvmae.weights import CLASSIFIER, load_classifier, load_mae, save_classifier, save_mae
from lvmae_cli.weights_cmd import export_hf, import_weights

transformers = pytest.importorskip("transformers")


def perturbed(cfg, seed: int = 0) -> MaskedVideoAutoencoder:
    torch.manual_seed(seed)
    model = MaskedVideoAutoencoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def mae_cfg(preset: str, frames: int, size: int, input_norm: str = "none"):
    cfg = preset_config(preset, num_frames=frames, img_size=size)
    cfg.pos_embed, cfg.input_norm = "videomae_1d", input_norm
    return cfg


def clip(frames: int, size: int, seed: int = 1) -> torch.Tensor:
    """(1, 3, T, H, W) uint8."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, frames, size, size), generator=g, dtype=torch.uint8)


def hf_pixels(directory: Path, video: torch.Tensor) -> torch.Tensor:
    """The exported preprocessor on uint8 frames -> pixel_values (1, T, C, H, W)."""
    proc = transformers.VideoMAEImageProcessor.from_pretrained(directory)
    frames = list(video[0].permute(1, 2, 3, 0).numpy())  # T x (H, W, C)
    return proc(frames, return_tensors="pt")["pixel_values"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def export_and_compare(tmp_path: Path, preset: str, frames: int, size: int, input_norm: str) -> float:
    cfg = mae_cfg(preset, frames, size, input_norm)
    model = perturbed(cfg)
    save_mae(model.state_dict(), cfg, tmp_path / "lv")
    export_hf(str(tmp_path / "lv"), str(tmp_path / "hf"))
    theirs = transformers.VideoMAEModel.from_pretrained(tmp_path / "hf").eval()
    video = clip(frames, size)
    with torch.no_grad():
        ours = model.encoder(video.float() / 255)
        out = theirs(hf_pixels(tmp_path / "hf", video)).last_hidden_state
    err = rel_err(out, ours)
    print(
        f"{preset} {frames}x{size} input_norm={input_norm}: max abs diff {float((out - ours).abs().max()):.3g}"
    )
    return err


# --- (a) round trip ------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact_and_the_key_bias_does_not_matter():
    cfg = mae_cfg("tiny", 16, 64)
    model = perturbed(cfg)
    state = model.state_dict()
    hf_state, hf_cfg = hf.encoder_to_hf(state, cfg)
    back, cfg2, _ = hf_import.hf_to_lvmae(hf_state, hf_cfg, hf.preprocessor_config(cfg))
    assert (cfg2.encoder.embed_dim, cfg2.encoder.depth, cfg2.encoder.num_heads) == (96, 4, 3)
    assert (cfg2.pos_embed, cfg2.input_norm, cfg2.video.num_frames, cfg2.video.img_size) == (
        "videomae_1d",
        "none",
        16,
        64,
    )
    for k, v in back.items():
        want = state[k].clone()
        if k.endswith("attn.qkv.bias"):
            want[96:192] = 0  # the key bias
        assert torch.equal(v, want), k
    assert set(back) == {k for k in state if k.startswith("encoder.")}
    # Zeroing the key bias leaves the encoder's output unchanged up to float32 rounding.
    zeroed = MaskedVideoAutoencoder(cfg2).eval()
    zeroed.load_state_dict({**state, **back})
    video = clip(16, 64).float() / 255
    with torch.no_grad():
        a, b = model.encoder(video), zeroed.encoder(video)
    assert any(state[k][96:192].abs().max() > 0.01 for k in state if k.endswith("attn.qkv.bias"))
    assert rel_err(b, a) < 1e-5


def test_sincos_3d_encoders_are_refused():
    cfg = mae_cfg("tiny", 16, 64)
    cfg.pos_embed = "sincos_3d"
    with pytest.raises(hf.ConversionError, match=r"model\.pos_embed"):
        hf.encoder_to_hf(perturbed(cfg).state_dict(), cfg)


# --- (b) features against VideoMAEModel ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames,input_norm", [(16, "none"), (16, "imagenet"), (32, "none"), (32, "imagenet")]
)
def test_tiny_features_match_transformers(tmp_path, frames, input_norm):
    assert export_and_compare(tmp_path, "tiny", frames, 64, input_norm) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("frames,input_norm", [(16, "imagenet"), (32, "none")])
def test_base_features_match_transformers(tmp_path, frames, input_norm):
    assert export_and_compare(tmp_path, "base", frames, 64, input_norm) < 1e-4


def test_preprocessor_config_follows_input_norm():
    none, imagenet = (hf.preprocessor_config(mae_cfg("tiny", 16, 64, n)) for n in ("none", "imagenet"))
    assert none["do_normalize"] is False and imagenet["do_normalize"] is True
    assert imagenet["crop_size"] == {"height": 64, "width": 64} and imagenet["rescale_factor"] == 1 / 255


# --- (c) classification ---------------------------------------------------------------------------------------


def test_fresh_head_export_matches_videomae_classification(tmp_path, capsys):
    cfg = mae_cfg("tiny", 16, 64, "imagenet")
    model = perturbed(cfg)
    save_mae(model.state_dict(), cfg, tmp_path / "lv")
    said = export_hf(str(tmp_path / "lv"), str(tmp_path / "hf"), num_classes=5)
    assert "freshly initialised 5-class head" in said[0]
    theirs = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    sd = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert sd["use_mean_pooling"] is True and len(sd["id2label"]) == 5
    hf_state = hf.new_classifier_to_hf(model.state_dict(), cfg, 5)[0]
    video = clip(16, 64)
    with torch.no_grad():
        enc = model.encoder
        x = enc.patch_embed(enc.normalize(video.float() / 255)) + enc.pos_embed
        for blk in enc.transformer.blocks:  # VideoMAE's fine-tuning layout: no per-token final norm
            x = blk(x)
        pooled = F.layer_norm(x.mean(1), (96,), hf_state["fc_norm.weight"], hf_state["fc_norm.bias"], 1e-5)
        ours = F.linear(pooled, hf_state["classifier.weight"], hf_state["classifier.bias"])
        logits = theirs(hf_pixels(tmp_path / "hf", video)).logits
    print(f"fresh-head logits: max abs diff {float((logits - ours).abs().max()):.3g}")
    assert rel_err(logits, ours) < 1e-4


def perturbed_classifier(cfg, pooling: str) -> VideoClassifier:
    """A 3-class classifier on a perturbed encoder, its fc_norm and head perturbed too."""
    clf = VideoClassifier(encoder_for(cfg, perturbed(cfg).state_dict()), 3, pooling=pooling).eval()
    with torch.no_grad():
        for p in (*clf.fc_norm.parameters(), *clf.head.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return clf


@pytest.mark.parametrize("input_norm", ["none", "imagenet"])
def test_fine_tuned_videomae_classifier_matches_transformers(tmp_path, input_norm):
    cfg = mae_cfg("tiny", 16, 64, input_norm)
    clf = perturbed_classifier(cfg, "videomae")
    save_classifier(clf.state_dict(), cfg, ["a", "b", "c"], tmp_path / "clf", pooling="videomae")
    said = export_hf(str(tmp_path / "clf"), str(tmp_path / "hf"))
    assert "fine-tuned 3-class classifier" in said[0]
    theirs = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.use_mean_pooling and theirs.config.id2label == {0: "a", 1: "b", 2: "c"}
    loaded, classes = load_classifier(tmp_path / "clf")
    assert loaded.pooling == "videomae" and classes == ["a", "b", "c"]
    # the eps moves these logits by ~1e-6 relative only, below the bound below: checked on its own
    assert loaded.fc_norm.eps == theirs.fc_norm.eps == 1e-5
    video = clip(16, 64)
    with torch.no_grad():
        ours = loaded(video.float() / 255)
        logits = theirs(hf_pixels(tmp_path / "hf", video)).logits
    diff = float((logits - ours).abs().max())
    print(
        f"fine-tuned classifier logits ({input_norm}): max abs diff {diff:.3g}, rel {rel_err(logits, ours):.3g}"
    )
    assert rel_err(logits, ours) < 1e-4


def test_norm_mean_classifier_is_refused(tmp_path):
    cfg = mae_cfg("tiny", 16, 64)
    clf = perturbed_classifier(cfg, "norm_mean")
    save_classifier(clf.state_dict(), cfg, ["a", "b", "c"], tmp_path / "clf", pooling="norm_mean")
    with pytest.raises(UserError, match=r"final norm.*finetune\.pooling=videomae"):
        export_hf(str(tmp_path / "clf"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "config.json").exists()


def test_classifier_saved_before_the_pooling_option_loads_as_norm_mean(tmp_path):
    """An export without classifier.json (as written before the option existed) was trained with the final
    norm on every token and fc_norm eps 1e-6: it loads so, with the same logits, and is not exported."""
    cfg = mae_cfg("tiny", 16, 64)
    clf = perturbed_classifier(cfg, "norm_mean")
    save_classifier(clf.state_dict(), cfg, ["a", "b", "c"], tmp_path / "old", pooling="norm_mean")
    (tmp_path / "old" / CLASSIFIER).unlink()
    loaded, _ = load_classifier(tmp_path / "old")
    assert loaded.pooling == "norm_mean" and loaded.fc_norm.eps == 1e-6
    video = torch.rand(1, 3, 16, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(video), clf(video))
    with pytest.raises(UserError, match="pooling 'norm_mean'"):
        export_hf(str(tmp_path / "old"), str(tmp_path / "hf"))


# --- (d) the original VideoMAE layout ----------------------------------------------------------------------


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' VideoMAEForPreTraining names -> the original VideoMAE pretraining names (test-local)."""

    def block(src: str, dst: str) -> dict[str, torch.Tensor]:
        a = src + "attention.attention."
        return {
            dst + "attn.qkv.weight": torch.cat([state[a + n + ".weight"] for n in ("query", "key", "value")]),
            dst + "attn.q_bias": state[a + "query.bias"],
            dst + "attn.v_bias": state[a + "value.bias"],
            dst + "attn.proj.weight": state[src + "attention.output.dense.weight"],
            dst + "attn.proj.bias": state[src + "attention.output.dense.bias"],
            **{
                dst + f"{b}.{p}": state[src + f"{a_}.{p}"]
                for b, a_ in (
                    ("norm1", "layernorm_before"),
                    ("norm2", "layernorm_after"),
                    ("mlp.fc1", "intermediate.dense"),
                    ("mlp.fc2", "output.dense"),
                )
                for p in ("weight", "bias")
            },
        }

    out = {
        "encoder.patch_embed.proj.weight": state["videomae.embeddings.patch_embeddings.projection.weight"],
        "encoder.patch_embed.proj.bias": state["videomae.embeddings.patch_embeddings.projection.bias"],
        "encoder.norm.weight": state["videomae.layernorm.weight"],
        "encoder.norm.bias": state["videomae.layernorm.bias"],
        "encoder_to_decoder.weight": state["encoder_to_decoder.weight"],
        "mask_token": state["mask_token"],
        "decoder.norm.weight": state["decoder.norm.weight"],
        "decoder.norm.bias": state["decoder.norm.bias"],
        "decoder.head.weight": state["decoder.head.weight"],
        "decoder.head.bias": state["decoder.head.bias"],
    }
    for i in range(2):
        out.update(block(f"videomae.encoder.layer.{i}.", f"encoder.blocks.{i}."))
    out.update(block("decoder.decoder_layers.0.", "decoder.blocks.0."))
    return out


SMALL = dict(
    image_size=32,
    patch_size=8,
    num_frames=8,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=192,
    layer_norm_eps=1e-6,
    use_mean_pooling=False,
)


def random_hf(cls, seed: int = 0, **extra):
    torch.manual_seed(seed)
    model = cls(transformers.VideoMAEConfig(**SMALL, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_original_layout_imports_to_the_same_features(tmp_path):
    theirs = random_hf(
        transformers.VideoMAEForPreTraining,
        decoder_hidden_size=384,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=6,
        decoder_intermediate_size=1536,
    )
    original = to_original({k: v.clone() for k, v in theirs.state_dict().items()})
    torch.save({"model": original}, tmp_path / "videomae.pth")
    notes = import_weights(
        str(tmp_path / "videomae.pth"), str(tmp_path / "lv"), num_frames=8, img_size=32, num_heads=4
    )
    assert not any("encoder only" in n for n in notes), notes
    ours = load_mae(tmp_path / "lv").eval()
    assert ours.cfg.input_norm == "imagenet" and ours.cfg.decoder.embed_dim == 384
    assert torch.equal(ours.state_dict()["head.weight"], original["decoder.head.weight"])
    video = clip(8, 32)
    x = video.float() / 255
    mean, std = (
        torch.tensor(hf.IMAGENET_MEAN)[:, None, None, None],
        torch.tensor(hf.IMAGENET_STD)[:, None, None, None],
    )
    with torch.no_grad():
        a = ours.encoder(x)
        b = theirs.videomae(((x[0] - mean) / std).permute(1, 0, 2, 3)[None]).last_hidden_state
    print(f"original layout: max abs diff {float((a - b).abs().max()):.3g}")
    assert rel_err(a, b) < 1e-4


def test_unknown_layout_and_missing_files_are_one_line_errors(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pth")
    for src, match in ((tmp_path / "x.pth", "unknown layout"), (tmp_path / "nope.pth", "does not exist")):
        with pytest.raises(UserError, match=match):
            import_weights(str(src), str(tmp_path / "out"))
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match=r"config\.json"):
        import_weights(str(tmp_path / "d"), str(tmp_path / "out"))


# --- (e) a transformers folder through `lvmae import`, then training from it ---------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    tmp = tmp_path_factory.mktemp("hf")
    theirs = random_hf(transformers.VideoMAEModel, seed=3)
    theirs.save_pretrained(tmp / "hf")
    run = subprocess.run(
        [*LVMAE, "import", str(tmp / "hf"), "--out", str(tmp / "lv")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "input_norm imagenet" in run.stdout  # no preprocessor config: VideoMAE's normalization
    return tmp / "lv", theirs


def test_transformers_folder_imports_to_the_same_features(imported):
    directory, theirs = imported
    ours = load_mae(directory).eval()
    x = clip(8, 32).float() / 255
    mean, std = (
        torch.tensor(hf.IMAGENET_MEAN)[:, None, None, None],
        torch.tensor(hf.IMAGENET_STD)[:, None, None, None],
    )
    with torch.no_grad():
        a = ours.encoder(x)
        b = theirs(((x[0] - mean) / std).permute(1, 0, 2, 3)[None]).last_hidden_state
    print(f"transformers folder import: max abs diff {float((a - b).abs().max()):.3g}")
    assert rel_err(a, b) < 1e-4


def test_import_cli_errors_exit_2(tmp_path):
    run = subprocess.run(
        [*LVMAE, "import", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "does not exist" in run.stderr


@pytest.mark.slow
def test_training_continues_from_an_import_at_another_frame_count(imported, train_data, tmp_path):
    hf_dir = imported[0].parent / "hf"
    # Imported as 16-frame clips; the run's clips are 8 frames: the positions are recomputed for its grid.
    import_weights(str(hf_dir), str(tmp_path / "lv16"), num_frames=16)
    assert load_mae(tmp_path / "lv16").cfg.video.num_frames == 16
    args = tiny_mae_args(
        train_data,
        tmp_path / "run",
        "model.encoder.embed_dim=48",
        "model.encoder.depth=2",
        "model.encoder.num_heads=4",
        "model.pos_embed=videomae_1d",
        "model.input_norm=imagenet",
        f"model.init_from={tmp_path / 'lv16'}",
        "run.steps=2",
        "run.checkpoint_every=2",
    )
    run = subprocess.run([*LVMAE, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    start = load_mae(tmp_path / "lv16").state_dict()["encoder.patch_embed.proj.weight"]
    after = load_mae(tmp_path / "run" / "export")
    assert after.cfg.video.num_frames == 8
    moved = after.state_dict()["encoder.patch_embed.proj.weight"] - start
    assert 0 < float(moved.abs().max()) < 0.1 * float(start.abs().max())  # trained on from the import
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_videomae_positions_are_transformers_table():
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    model = MaskedVideoAutoencoder(mae_cfg("tiny", 16, 64))
    assert np.allclose(
        model.encoder.pos_embed[0].numpy(), get_sinusoid_encoding_table(128, 96)[0].numpy(), atol=1e-6
    )
