"""The health probe inside a pretraining run (train.health, eval.*): its figures, and a real run with it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_data import free_port

from lvmae.config import ConfigError
from train.config import load_train_config
from train.health import effective_rank, feature_spread, knn_top1
from train.runlog import read_log

REPO = Path(__file__).resolve().parents[1]


def clusters(n: int, dim: int = 32, classes: int = 3, noise: float = 0.3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(n) % classes
    return centres[labels] + noise * torch.randn(n, dim, generator=gen), labels


def test_knn_scores_separable_features_right_and_unrelated_labels_near_chance():
    bank, bank_y = clusters(120)
    held, held_y = clusters(60, seed=1)
    assert knn_top1(bank, bank_y, held, held_y, k=10) == 1.0
    # the same features with labels that have nothing to do with them: chance (1/3), not better
    shuffled = bank_y[torch.randperm(len(bank_y), generator=torch.Generator().manual_seed(0))]
    scores = [knn_top1(bank, shuffled, held, held_y[torch.randperm(60)], k=10) for _ in range(20)]
    assert 0.2 < sum(scores) / len(scores) < 0.47


def test_collapse_signals_tell_collapsed_from_spread_features():
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(400, 16, generator=gen)
    assert 0.9 < feature_spread(spread) <= 1.0
    assert 14 < effective_rank(spread) <= 16
    same = torch.ones(50, 16) * 3.0
    assert feature_spread(same) == pytest.approx(0.0, abs=1e-6) and effective_rank(same) == 0.0
    # every clip on one line through the space: one direction, spread small once a common offset dominates
    line = torch.randn(50, 1, generator=gen) @ torch.randn(1, 16, generator=gen)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    offset = torch.full((50, 16), 10.0) + 0.01 * torch.randn(50, 16, generator=gen)
    assert feature_spread(offset) < 0.01


def test_eval_settings_are_checked():
    base = {"data": {"url": "x", "tokens": "t"}}
    with pytest.raises(ConfigError, match=r"run\.keep_best: needs the in-run probe"):
        load_train_config([base], ["run.keep_best=true"])
    with pytest.raises(ConfigError, match=r"eval\.split: must differ"):
        load_train_config([base], ["eval.every=5", "eval.split=train"])
    with pytest.raises(ConfigError, match=r"eval\.split: must be one of"):
        load_train_config([base], ["eval.every=5", "eval.split=holdout"])
    cfg = load_train_config([base], ["eval.every=5", "run.keep_best=true"])
    assert cfg.eval.split == "val" and cfg.eval.train_split == "train"


def launch_mae(data: Path, out: Path, nproc: int, *extra: str) -> str:
    """`lvmae launch --nproc N -- train mae`: a tiny pixel-target MAE on the 16-frame 32 px colour clips."""
    args = [str(REPO / "configs/demo_cpu.yaml"), "model.video.img_size=32", "model.video.patch_size=8"]
    args += ["model.masking.decoder=random", "model.target.kind=pixels", f"data.url={data}"]
    args += ["data.split=train", "data.batch_size=2", "data.shuffle_buffer=8", "optim.warmup_steps=2"]
    args += ["run.steps=4", "run.checkpoint_every=0", "run.metrics_port_base=0", f"run.out={out}", *extra]
    cmd = [sys.executable, "-m", "lvmae_cli", "launch", f"--nproc={nproc}", f"--master-port={free_port()}"]
    run = subprocess.run([*cmd, "--", "train", "mae", *args], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_a_run_evaluates_itself_keeps_its_best_checkpoint_and_trains_as_without(colour_data, tmp_path):
    """Two ranks, ZeRO-3, an eval at every step from 0. (Evals after a resume, which once left ZeRO-3
    parameters released under the next step, are exercised by tests/test_demo.py: an eval at every step
    of a run stopped half way and resumed.)"""
    data = colour_data / "data"
    evals = ["eval.every=1", "eval.split=test", "eval.k=5"]
    out = launch_mae(data, tmp_path / "two", 2, *evals, "run.keep_best=true", "run.keep_last=1")
    log = read_log(tmp_path / "two" / "train_log.jsonl")
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4]
    figures = {r["step"]: r["eval"] for r in log if "eval" in r}
    assert sorted(figures) == [0, 1, 2, 3, 4]  # step 0 (random init), then every step
    for f in figures.values():
        assert f["clips"] == figures[0]["clips"]
        assert 0 <= f["knn_top1"] <= 1 and f["chance"] == pytest.approx(1 / 3, abs=1e-3)
        assert 0 < f["feature_spread"] <= 1 and 1 <= f["effective_rank"] <= f["clips"][1]
    assert figures[0]["clips"][1] == 9  # every test clip of the colour data set (36 videos, test share 0.25)
    assert "eval at step 0: k-NN top-1" in out

    # keep_best: the best eval's checkpoint is kept beside the last one, named by best.json
    ckpts = tmp_path / "two" / "checkpoints"
    best = json.loads((ckpts / "best.json").read_text())
    top = max(f["knn_top1"] for s, f in figures.items() if s > 0)
    first_top = min(s for s, f in figures.items() if s > 0 and f["knn_top1"] == top)
    assert best["step"] == first_top and best["knn_top1"] == top
    assert (ckpts / best["checkpoint"] / "meta.json").is_file() and (ckpts / "step-00000004").is_dir()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["eval"]["first"]["step"] == 0 and summary["eval"]["last"]["step"] == 4
    assert summary["eval"]["best"]["step"] == best["step"]

    # the figures depend on the weights only: one rank gets the random-init figures of two ranks
    one = launch_mae(data, tmp_path / "one", 1, *evals, "run.steps=1", "optim.total_steps=300")
    assert "eval at step 0" in one
    first = read_log(tmp_path / "one" / "train_log.jsonl")[0]["eval"]
    for key in ("knn_top1", "feature_spread", "effective_rank", "clips"):
        assert first[key] == pytest.approx(figures[0][key], rel=1e-3, abs=1e-4), key

    # ... and evaluating does not change what the run trains: the same losses without it
    launch_mae(data, tmp_path / "plain", 2)
    plain = [(r["step"], r["loss"]) for r in read_log(tmp_path / "plain" / "train_log.jsonl")]
    assert plain == [(r["step"], r["loss"]) for r in log if "loss" in r]
