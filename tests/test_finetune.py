"""`lvmae finetune`: a pretrained encoder + classifier on labelled clips, through the pretraining trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals.finetune import FinetuneTask, load_finetune_config, mixup, random_window, soft_targets
from lvmae.weights import load_classifier
from train.engine import param_groups
from train.runlog import read_log

REPO = Path(__file__).resolve().parents[1]


def task_for(colour_data: Path, *extra: str) -> FinetuneTask:
    cfg = load_finetune_config(
        [], [f"finetune.init_from={colour_data / 'export'}", f"data.url={colour_data}", *extra]
    )
    task = FinetuneTask(cfg)
    task.set_classes(["blue", "green", "red"])
    return task


def test_layer_wise_lr_decay_groups(colour_data):
    task = task_for(colour_data, "finetune.layer_decay=0.5")
    lr_of = {}
    model = task.build_model()
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05, 1e-3, task.lr_scale)
    for g in groups:
        for p in g["params"]:
            lr_of[by_id[id(p)]] = g["lr"]
    assert groups[0]["lr"] == 1e-3  # the first group carries the full lr (what the trainer logs)
    assert lr_of["head.weight"] == lr_of["fc_norm.weight"] == 1e-3
    assert lr_of["encoder.transformer.blocks.3.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr_of["encoder.transformer.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5**4)
    assert lr_of["encoder.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5**5)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim == 1 for p in g["params"]))


def test_initial_state_is_the_pretrained_encoder_or_random(colour_data):
    from safetensors.torch import load_file

    pretrained = load_file(colour_data / "export" / "model.safetensors")
    state = task_for(colour_data).initial_state()
    assert torch.equal(
        state["encoder.transformer.blocks.2.mlp.fc1.weight"],
        pretrained["encoder.transformer.blocks.2.mlp.fc1.weight"],
    )
    assert "head.weight" in state and not any(k.startswith("decoder") for k in state)
    assert "encoder.transformer.norm.weight" not in state  # pooling videomae (the default): no final norm
    old = task_for(colour_data, "finetune.pooling=norm_mean").initial_state()
    assert torch.equal(old["encoder.transformer.norm.weight"], pretrained["encoder.transformer.norm.weight"])
    assert task_for(colour_data, "finetune.random_init=true").initial_state() is None


def test_soft_targets_mixup_and_random_window():
    t = soft_targets(torch.tensor([0, 2]), 3, 0.3)
    assert torch.allclose(t, torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]))
    video = torch.rand(4, 3, 8, 6, 6)
    mixed, targets = mixup(
        video, soft_targets(torch.tensor([0, 1, 2, 0]), 3, 0.0), 0.8, torch.Generator().manual_seed(0)
    )
    assert mixed.shape == video.shape and torch.allclose(targets.sum(1), torch.ones(4))
    crop = random_window(video, 4, 4, torch.Generator().manual_seed(1))
    assert crop.shape == (4, 3, 4, 4, 4)


def finetune(colour_data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lvmae_cli", "finetune", f"finetune.init_from={colour_data / 'export'}"]
    cmd += [
        f"data.url={colour_data / 'data'}",
        "data.batch_size=4",
        "data.shuffle_buffer=16",
        "data.decoder=pyav",
    ]
    cmd += [f"run.out={out}", "run.metrics_port_base=0", "run.checkpoint_every=10", "run.log_every=10"]
    cmd += ["run.steps=20", "optim.total_steps=20", "optim.warmup_steps=4", "finetune.mixup=0.5", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_finetune_trains_resumes_exactly_and_scores(colour_data, tmp_path):
    straight = finetune(colour_data, tmp_path / "straight")
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "test: top-1" in straight.stdout
    half = finetune(colour_data, tmp_path / "resumed", "run.steps=10")
    assert half.returncode == 0, half.stderr
    rest = finetune(colour_data, tmp_path / "resumed", "--resume", "auto")
    assert rest.returncode == 0 and "resumed from" in rest.stdout, rest.stderr
    a, b = (
        read_log(tmp_path / "straight" / "train_log.jsonl"),
        read_log(tmp_path / "resumed" / "train_log.jsonl"),
    )
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 20
    assert all(0 <= r["accuracy"] <= 1 for r in a)
    results = json.loads((tmp_path / "straight" / "eval.json").read_text())
    assert results["test"]["num_clips"] == 9 and results["test"]["top1"] > 0.6, results["test"]  # chance 1/3
    model, classes = load_classifier(tmp_path / "straight" / "export")
    assert classes == ["blue", "green", "red"] and model(torch.rand(1, 3, 16, 32, 32)).shape == (1, 3)
    assert model.pooling == results["pooling"] == "videomae"
    assert (tmp_path / "straight" / "confusion.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["finetune.num_frames=32"], "the encoder runs on 32 frames of 32 px, but the clips"),
        (["finetune.init_from=/nonexistent"], "neither an exported model"),
        (["data.split=null"], "fine-tune on one split"),
        (["finetune.num_frames=15"], "does not tile 15 frames"),
    ],
)
def test_finetune_errors_are_one_clear_line(colour_data, tmp_path, extra, message):
    proc = finetune(colour_data, tmp_path / "x", *extra)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_finetune_refuses_a_data_set_without_labels(colour_data, train_data, tmp_path):
    proc = finetune(colour_data, tmp_path / "x", f"data.url={train_data[0]}")
    assert proc.returncode == 2 and "has no labels" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_finetune_refuses_eval_classes_missing_from_training(colour_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in (colour_data / "data").iterdir():
        if p.name != "index.json":
            (data / p.name).symlink_to(p)
    index = json.loads((colour_data / "data" / "index.json").read_text())
    counts = index["labels"]["counts"]
    counts["test"]["blue"], counts["train"]["blue"] = counts["test"].get("blue", 0) + 1, 0
    (data / "index.json").write_text(json.dumps(index))
    proc = finetune(colour_data, tmp_path / "x", f"data.url={data}")
    assert proc.returncode == 2 and "classes blue have val clips but none in data.split=train" in proc.stderr


@pytest.mark.slow
def test_two_ranks_start_from_the_pretrained_encoder(colour_data, tmp_path):
    """Under ZeRO-3 on 2 ranks the pretrained weights reach every partition: after one step at lr 1e-12
    the exported encoder is the pretrained one."""
    from safetensors.torch import load_file

    cmd = [sys.executable, "-m", "lvmae_cli", "launch", "--nproc", "2", "--launcher", "torchrun", "--"]
    cmd += ["finetune", f"finetune.init_from={colour_data / 'export'}", f"data.url={colour_data / 'data'}"]
    cmd += ["data.batch_size=2", "data.shuffle_buffer=8", "data.decoder=pyav", f"run.out={tmp_path / 'run'}"]
    cmd += ["run.steps=1", "optim.total_steps=1", "optim.warmup_steps=0", "optim.lr=1e-12", "optim.min_lr=0"]
    cmd += ["run.metrics_port_base=0", "finetune.eval_splits=[]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    before = load_file(colour_data / "export" / "model.safetensors")
    after = load_file(tmp_path / "run" / "export" / "model.safetensors")
    encoder = [k for k in after if k.startswith("encoder.")]
    assert len(encoder) == 50  # 4 blocks + the embedding; no final norm with pooling videomae
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in encoder)
