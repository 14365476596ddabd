"""`lvmae train mae` with model.init_from: an exported MAE's weights start the run, on another clip length."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvmae.config import ConfigError
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.presets import preset_config
from lvmae.weights import save_mae
from train.config import load_train_config
from train.runlog import read_log
from train.tasks import MAETask

REPO = Path(__file__).resolve().parents[1]
# A tiny pixel-target MAE on 32 px clips with 8 px patches (no token set needed).
MODEL = ["model.preset=tiny", "model.video.img_size=32", "model.video.patch_size=8"]
MODEL += ["model.masking.decoder=random", "model.target.kind=pixels"]


def export(directory: Path, frames: int = 8, **sizes: int) -> Path:
    """A tiny MAE at `frames` frames, every tensor moved off its init (so a loaded weight is recognisable)."""
    cfg = preset_config("tiny", num_frames=frames, img_size=32, patch_size=8)
    cfg.masking.decoder, cfg.target.kind = "random", "pixels"
    for key, value in sizes.items():
        part, name = key.split("__")
        setattr(getattr(cfg, part), name, value)
    torch.manual_seed(1)
    model = MaskedVideoAutoencoder(cfg)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    return save_mae(state, model.cfg, directory)


def task_for(source: Path, *extra: str) -> MAETask:
    cfg = load_train_config(
        [], [*MODEL, "model.video.num_frames=16", f"model.init_from={source}", "data.url=/x", *extra]
    )
    return MAETask(cfg)


def test_an_8_frame_export_starts_a_16_frame_run(tmp_path, capsys):
    src = load_file(export(tmp_path / "e") / "model.safetensors")
    state = task_for(tmp_path / "e").initial_state()
    assert set(state) == set(src) and all(torch.equal(state[k], src[k]) for k in state)
    assert "encoder and decoder from export" in capsys.readouterr().out
    assert MAETask(load_train_config([], [*MODEL, "data.url=/x"])).initial_state() is None
    # Positions are this run's: the model built for 16 frames holds the 16-frame table.
    model = MAETask(load_train_config([], [*MODEL, "model.video.num_frames=16", "data.url=/x"])).build_model()
    model.load_state_dict(state, strict=True)
    assert model.encoder.pos_embed.shape[1] == 8 * 4 * 4


def test_a_decoder_of_other_shapes_keeps_its_fresh_init(tmp_path, capsys):
    src = load_file(export(tmp_path / "e", decoder__embed_dim=32, decoder__num_heads=2) / "model.safetensors")
    task = task_for(tmp_path / "e", "run.seed=3")
    state = task.initial_state()
    assert all(torch.equal(state[k], src[k]) for k in state if k.startswith("encoder."))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "the decoder keeps its fresh init" in out, out
    torch.manual_seed(3)  # the run's seed: the decoder is what a run without init_from starts with
    fresh = task.build_model().state_dict()
    assert all(torch.equal(state[k], fresh[k]) for k in state if not k.startswith("encoder."))


@pytest.mark.parametrize(
    ("extra", "sizes", "message"),
    [
        (["model.encoder.depth=3"], {}, "model.encoder.depth 3 (the source's: 4)"),
        (["model.video.tubelet_size=4"], {}, "model.video.tubelet_size 4 (the source's: 2)"),
        (["model.pos_embed=sincos_3d"], {}, "model.pos_embed 'sincos_3d' (the source's: 'videomae_1d')"),
        ([], {"encoder__embed_dim": 64, "encoder__num_heads": 2}, "model.encoder.embed_dim"),
    ],
)
def test_an_encoder_that_differs_is_one_clear_error(tmp_path, extra, sizes, message):
    export(tmp_path / "e", **sizes)
    with pytest.raises(ConfigError, match=r"^model\.init_from: export .* cannot start this run") as err:
        task_for(tmp_path / "e", *extra)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_train_mae_starts_from_the_export(colour_data, tmp_path):
    """One rank, 2 steps at a negligible lr: the run's export is the source's weights, its loss finite."""
    src = load_file(export(tmp_path / "e") / "model.safetensors")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lvmae_cli", "train", "mae", *MODEL, "model.video.num_frames=16"]
    cmd += [f"model.init_from={tmp_path / 'e'}", f"data.url={colour_data / 'data'}", "data.decoder=pyav"]
    cmd += ["data.batch_size=2", "data.shuffle_buffer=8", "optim.lr=1e-30", "optim.min_lr=0"]
    cmd += ["optim.warmup_steps=0", "optim.total_steps=2", "run.steps=2", "run.precision=fp32"]
    cmd += [f"run.out={out}", "run.metrics_port_base=0", "run.checkpoint_every=0", "run.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "model.init_from: encoder and decoder from export" in proc.stdout
    assert len(read_log(out / "train_log.jsonl")) == 2
    trained = load_file(out / "export" / "model.safetensors")
    assert set(trained) == set(src) and all(torch.equal(trained[k], src[k]) for k in src)
