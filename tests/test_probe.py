"""The attentive probe (`lvmae eval probe`): views, scores, the encoder on another grid, the command."""

import json
from pathlib import Path

import pytest
import torch

from evals.accuracy import scores
from evals.features import cut_views, view_starts
from evals.probe import ProbeConfig, run_probe
from lvmae.heads import AttentiveProbe, VideoClassifier, encoder_for, layer_id
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.presets import preset_config
from lvmae_cli.main import main


def test_view_starts_and_cut_views():
    assert view_starts(128, 32, 4) == [0, 32, 64, 96]
    assert view_starts(128, 32, 1) == [48] and view_starts(32, 32, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        view_starts(16, 32, 1)
    video = torch.arange(2 * 3 * 8 * 6 * 6, dtype=torch.float32).reshape(2, 3, 8, 6, 6)
    views = cut_views(video, 4, 4, 2, 2)
    assert views.shape == (2, 4, 3, 4, 4, 4)
    assert torch.equal(views[:, 0], video[:, :, 0:4, 0:4, 0:4])  # first window, top-left crop
    assert torch.equal(views[:, 3], video[:, :, 4:8, 2:6, 2:6])  # last window, bottom-right crop


def test_scores_top1_topk_per_class_confusion():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 2, 1], [1, 0, 2]])
    labels = torch.tensor([0, 1, 2, 2])
    s = scores(logits, labels, ["a", "b", "c"])
    assert s["top1"] == 0.75 and s["top3"] == 1.0 and s["chance"] == 0.3333
    assert s["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.5}
    assert s["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_encoder_runs_on_another_grid_with_the_same_weights():
    cfg = preset_config("tiny", num_frames=16, img_size=32, patch_size=8)
    state = MaskedVideoAutoencoder(cfg).state_dict()
    long = encoder_for(cfg, state, num_frames=64)
    short = encoder_for(cfg, state)
    assert long(torch.rand(1, 3, 64, 32, 32)).shape == (1, 32 * 16, 96)
    for name, p in short.named_parameters():
        assert torch.equal(p, dict(long.named_parameters())[name])
    # positions are absolute: the first 8 time steps of the 64-frame table are the 16-frame table
    assert torch.equal(long.pos_embed[:, : 8 * 16], short.pos_embed)
    with pytest.raises(ValueError, match="does not tile 15 frames"):
        encoder_for(cfg, state, num_frames=15)


def test_heads_shapes_and_layer_ids():
    cfg = preset_config("tiny", num_frames=8, img_size=32, patch_size=8)
    enc = encoder_for(cfg, None)
    assert AttentiveProbe(96, 5, num_heads=4)(torch.rand(2, 10, 96)).shape == (2, 5)
    clf = VideoClassifier(enc, 7)
    assert clf(torch.rand(2, 3, 8, 32, 32)).shape == (2, 7)
    ids = {n: layer_id(n, 4) for n, _ in clf.named_parameters()}
    assert (
        ids["encoder.patch_embed.proj.weight"] == 0
        and ids["encoder.transformer.blocks.3.mlp.fc1.weight"] == 4
    )
    assert ids["head.weight"] == ids["fc_norm.weight"] == ids["encoder.transformer.norm.weight"] == 5


def test_probe_learns_a_learnable_task_and_writes_its_report(colour_data, tmp_path):
    r = run_probe(
        str(colour_data / "export"),
        str(colour_data / "data"),
        ProbeConfig(epochs=15, decoder="pyav"),
        str(tmp_path),
    )
    test = r["test"]
    assert test["num_clips"] == 9 and r["num_train_clips"] + r["val"]["num_clips"] + 9 == 36
    assert test["top1"] >= 0.8, test  # chance is 1/3
    assert r["train_loss_first_last"][1] < r["train_loss_first_last"][0]
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["classes"] == ["blue", "green", "red"] and saved["test"]["confusion"] == test["confusion"]
    assert (tmp_path / "confusion.png").stat().st_size > 0 and (tmp_path / "examples.png").stat().st_size > 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "probe.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["blue", "green", "red"]
    # the features are cached: a second probe with other probe settings reuses them
    cached = sorted(p.name for p in (tmp_path / "features").iterdir())
    r2 = run_probe(
        str(colour_data / "export"),
        str(colour_data / "data"),
        ProbeConfig(epochs=15, decoder="pyav", seed=1),
        str(tmp_path),
    )
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == cached
    assert r2["test"]["num_clips"] == 9 and Path(r2["examples_png"]).is_file()  # examples come from the cache


def test_probe_on_other_frames_with_views_and_random_init(colour_data, tmp_path):
    cfg = ProbeConfig(epochs=3, decoder="pyav", frames=8, temporal_views=2, random_init=True)
    r = run_probe(str(colour_data / "export"), str(colour_data / "data"), cfg, str(tmp_path))
    assert r["random_init"] and r["encoder"]["frames"] == 8 and r["encoder"]["views"] == "2x1"
    feats = list((tmp_path / "features").glob("*-train.safetensors"))
    from safetensors.torch import load_file

    assert load_file(feats[0])["features"].shape[1:] == (2, 4 * 16, 96)  # 2 views of 4 x 4 x 4 tokens


def test_probe_command_and_its_clear_errors(colour_data, tmp_path, capsys):
    data, export = str(colour_data / "data"), str(colour_data / "export")
    assert (
        main(["eval", "probe", export, data, "--out", str(tmp_path), "--epochs", "2", "--decoder", "pyav"])
        == 0
    )
    assert "test top-1" in capsys.readouterr().out
    cases = [
        ([export, data, "--frames", "32"], "holds 16-frame 32 px clips"),
        ([export, data, "--frames", "15"], "does not tile 15 frames"),
        ([export, data, "--views", "4"], "expected TEMPORALxSPATIAL"),
        ([str(tmp_path), data], "neither an exported model"),
    ]
    for args, message in cases:
        assert main(["eval", "probe", *args, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    # weights that do not fit the encoder their config describes
    from lvmae.weights import save_mae

    cfg = preset_config("tiny", num_frames=16, img_size=32, patch_size=8)
    wrong = preset_config("tiny", num_frames=16, img_size=32, patch_size=16)
    wrong.masking.encoder_ratio = 0.5
    save_mae(MaskedVideoAutoencoder(wrong).state_dict(), cfg, tmp_path / "mixed")
    assert main(["eval", "probe", str(tmp_path / "mixed"), data, "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "do not fit the tiny encoder" in err and "patch_embed.proj.weight" in err
    # a data set without labels, and a class with test clips but no training clips
    unlabelled = tmp_path / "unlabelled"
    index = json.loads((colour_data / "data" / "index.json").read_text())
    for name, entry, message in (
        (
            "unlabelled",
            {**index["labels"], "classes": [], "counts": {"train": {"": 5}, "test": {"": 2}}},
            "no labels",
        ),
        (
            "unknown",
            {**index["labels"], "counts": {"train": {"red": 5, "blue": 0}, "test": {"blue": 2}}},
            "classes blue have test samples but no training samples",
        ),
    ):
        unlabelled = tmp_path / name
        unlabelled.mkdir()
        for p in (colour_data / "data").iterdir():
            if p.name != "index.json":
                (unlabelled / p.name).symlink_to(p)
        (unlabelled / "index.json").write_text(json.dumps({**index, "labels": entry}))
        assert main(["eval", "probe", export, str(unlabelled), "--out", str(tmp_path / "y")]) == 2
        assert message in capsys.readouterr().err
