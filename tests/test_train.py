"""`lvmae train` and `lvmae launch` end to end on real clip shards: DeepSpeed ZeRO-3 on CPU processes.

Clips: 8-frame 32 px VP9 clips of the four real sample videos. The models use 8 px patches so that the
grids stay tiny (4 x 4 x 4 tokens) and a step takes milliseconds; what is tested is the trainer around them:
the launchers, checkpoints, kill -9 and resume, export, and the errors users meet.
"""

from __future__ import annotations

import base64
import json
import math
import re
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_data import (
    LVMAE,
    VIDEO,
    finish,
    kill_9_all,
    launch,
    losses,
    mae_args,
    tiny_mae_args,
    wait_for_step,
)

from ingest.tokens import ingest_tokens
from lvmae.tokenizer import load_tokenizer
from lvmae.weights import load_mae
from lvmae_cli.launch_cmd import launcher_command
from train.config import OptimConfig
from train.engine import lr_at, scaled_optim
from train.runlog import read_log

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_VIDEO = [o.replace("model.", "tokenizer.") for o in VIDEO]


@pytest.fixture(scope="module")
def data(train_data) -> tuple[Path, str]:
    return train_data


@pytest.mark.slow
def test_two_ranks_train_checkpoint_and_export(uninterrupted: Path):
    log = losses(uninterrupted)
    assert [s for s, _, _ in log] == list(range(1, 13))
    assert all(math.isfinite(loss) for _, loss, _ in log)
    assert read_log(uninterrupted / "train_log.jsonl")[0]["samples"] == 4  # 2 ranks x batch 2
    ckpts = uninterrupted / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000008", "step-00000012"]  # keep_last 2
    assert (ckpts / "latest").read_text().strip() == "step-00000012"
    assert not list(ckpts.glob(".tmp-*"))
    step12 = ckpts / "step-00000012"
    assert json.loads((step12 / "meta.json").read_text())["world_size"] == 2
    assert {p.name for p in step12.glob("rank-*.json")} == {"rank-00000.json", "rank-00001.json"}
    # The exported weights load into the model library and are the trained ones, not the initial ones.
    model = load_mae(uninterrupted / "export")
    torch.manual_seed(0)  # the trainer's seed: the same initial weights
    initial = type(model)(model.cfg).state_dict()
    trained = model.state_dict()
    assert set(trained) == set(initial)
    assert all(not torch.equal(trained[k], initial[k]) for k in trained if k.endswith("weight"))
    out = model(torch.rand(1, 3, 8, 32, 32), priority=torch.rand(1, 4, 4, 4))
    assert torch.isfinite(out.pred).all()
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["loader"]["samples"] > 0


@pytest.mark.slow
def test_probe_source_rebuilds_a_checkpoints_weights(uninterrupted: Path):
    """`lvmae eval probe` takes a checkpoint folder: its ZeRO-3 shards give the exported weights."""
    from train.pretrained import load_pretrained

    cfg, state, what = load_pretrained(str(uninterrupted / "checkpoints" / "step-00000012"))
    exported = load_mae(uninterrupted / "export").state_dict()
    assert what.startswith("checkpoint") and cfg.video.num_frames == 8
    assert set(state) == set(exported) and all(torch.equal(state[k], exported[k]) for k in state)
    _, from_run, what = load_pretrained(str(uninterrupted))  # a run folder: its export/
    assert what.startswith("export") and torch.equal(from_run["head.weight"], exported["head.weight"])


@pytest.mark.slow
def test_export_hf_takes_a_checkpoint(uninterrupted: Path, tmp_path: Path):
    """`lvmae export hf` reads weights through the same loader as the probe: a checkpoint folder gives
    the transformers weights its export gives."""
    from safetensors.torch import load_file

    from lvmae_cli.weights_cmd import export_hf

    export_hf(str(uninterrupted / "checkpoints" / "step-00000012"), str(tmp_path / "from-ckpt"))
    export_hf(str(uninterrupted / "export"), str(tmp_path / "from-export"))
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("from-ckpt", "from-export"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_loss_curve(data, uninterrupted: Path, tmp_path: Path):
    out = tmp_path / "killed"
    proc = launch(mae_args(data, out), launcher="torchrun")
    wait_for_step(proc, out, 6)
    kill_9_all(proc)
    killed_at = max(s for s, _, _ in losses(out))
    assert 6 <= killed_at < 12

    # Without --resume the run refuses to start over its checkpoints.
    refused = subprocess.run(
        [*LVMAE, *mae_args(data, out)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert refused.returncode == 2 and "--resume auto" in refused.stderr, refused.stderr[-2000:]

    text = finish(launch([*mae_args(data, out), "--resume", "auto"]))
    # From step 4, or from step 8 if its save finished before the kill.
    assert re.search(r"resumed from \S+/step-0000000[48] at step [48]\b", text), text[-3000:]
    # Every step once, with exactly the losses and learning rates of the run that was never killed.
    assert losses(out) == losses(uninterrupted)
    a, b = load_file(out / "export/model.safetensors"), load_file(uninterrupted / "export/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_tokenizer_training_exports_what_ingest_tokens_reads(data, tmp_path: Path):
    url, _ = data
    out = tmp_path / "tok"
    args = [
        "train",
        "tokenizer",
        str(REPO / "configs/tokenizer_demo_cpu.yaml"),
        *TOKENIZER_VIDEO,
        "tokenizer.channel_mult=[1,1,2,2]",
        "tokenizer.fsq_levels=[8,5,5]",
        "tokenizer.keep_warmup_steps=2",  # the keep-ratio warm-up follows the trainer's step
        f"data.url={url}",
        "data.batch_size=2",
        "run.steps=4",
        "run.checkpoint_every=0",
        "run.metrics_port_base=0",
        f"run.out={out}",
    ]
    run = subprocess.run([*LVMAE, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000004"]  # only at the end
    tokenizer = load_tokenizer(out / "tokenizer")  # verifies the id against config and weights
    assert list(tokenizer.cfg.fsq_levels) == [8, 5, 5]
    summary = ingest_tokens(str(url), str(out / "tokenizer"), device="cpu", progress=False)
    assert summary.num_valid > 0


def test_bf16_run_exports_float32_weights(data, tmp_path: Path):
    out = tmp_path / "bf16"
    args = mae_args(data, out, "run.precision=bf16", "run.steps=2", "run.checkpoint_every=0")
    run = subprocess.run([*LVMAE, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "bf16" in run.stdout
    weights = load_file(out / "export/model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert load_mae(out / "export") is not None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["run.precision=fp16"], r"run.precision: must be one of auto, fp32, bf16"),
        (["data.url=/nonexistent/data"], r"not a complete data set \(no index.json\)"),
        (["data.tokens=fsq-0000000000000000"], r"no token store .*tokens/fsq-0000000000000000"),
        (["model.target.fsq_levels=[8,8,8]"], r"model.target.fsq_levels: \[8, 8, 8\] differs"),
        (["model.video.num_frames=16"], r"model.video: the model takes 16 frames of 32 px, but the clips"),
        (["run.out=nosuch://bucket/run"], r"run.out: unknown storage protocol 'nosuch'"),
        (  # at engine build, once the global batch is known: 1.5e-4 x 2 / 256 is below min_lr 1e-5
            ["optim.lr=1.5e-4", "optim.lr_reference_batch=256"],
            r"optim.min_lr: 1e-05 is above the run's peak lr 1.17e-06",
        ),
    ],
)
def test_user_errors_are_one_clear_line(data, tmp_path: Path, extra: list[str], message: str):
    args = mae_args(data, tmp_path / "run", *extra)
    run = subprocess.run([*LVMAE, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), run.stderr[-2000:]


def test_launch_checks_the_config_before_starting_ranks(data, tmp_path: Path):
    args = mae_args(data, tmp_path / "run", "optim.lr=fast")
    run = subprocess.run(
        [*LVMAE, "launch", "--nproc=2", "--", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "optim.lr" in run.stderr
    assert "lvmae launch:" not in run.stdout  # no launcher was started


def test_launcher_commands():
    rest = ["train", "mae", "r.yaml", "--resume", "auto"]
    ds = launcher_command("deepspeed", None, rest, hostfile="hosts", num_nodes=2, master_addr="10.0.0.1")
    assert ds[0].endswith("deepspeed")
    assert ds[1:] == [
        "--master_port=29500",
        "--hostfile=hosts",
        "--num_nodes=2",
        "--master_addr=10.0.0.1",
        "--no_local_rank",
        "--module",
        "lvmae_cli",
        *rest,
    ]
    local = launcher_command("deepspeed", 2, rest, master_port=1234)  # DeepSpeed's node launcher, directly
    assert local[1:4] == ["-u", "-m", "deepspeed.launcher.launch"] and local[-len(rest) - 1 :] == [
        "lvmae_cli",
        *rest,
    ]
    world = next(a for a in local if a.startswith("--world_info="))[len("--world_info=") :]
    assert json.loads(base64.urlsafe_b64decode(world)) == {"localhost": [0, 1]}
    assert {"--master_addr=127.0.0.1", "--master_port=1234", "--module", "--no_local_rank"} <= set(local)
    assert "--num_gpus=8" in launcher_command("deepspeed", 8, rest, hostfile="hosts")
    tr = launcher_command(
        "torchrun", 2, rest, num_nodes=2, node_rank=1, master_addr="10.0.0.1", master_port=1234
    )
    assert tr[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc_per_node=2", "--nnodes=2", "--node_rank=1", "--master_port=1234"} <= set(tr)
    assert tr[-len(rest) - 2 :] == ["-m", "lvmae_cli", *rest]


def test_a_busy_metrics_port_is_one_clear_line(data, tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = mae_args(data, tmp_path / "run", f"run.metrics_port_base={port}")
        run = subprocess.run([*LVMAE, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"cannot serve metrics on 127.0.0.1:{port}" in run.stderr
    assert "run.metrics_port_base" in run.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_deepspeed_launchers_local_rank_argument_is_accepted():
    """Started by `deepspeed` without --no_local_rank, a rank gets `--local_rank=N` before its arguments."""
    cmd = [*LVMAE, "--local_rank=1", "train", "mae", str(REPO / "configs/demo_cpu.yaml"), "data.tokens=x"]
    run = subprocess.run([*cmd, "run.precision=fp16"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "run.precision: must be one of" in run.stderr, run.stderr
    assert "unrecognized arguments" not in run.stderr


@pytest.mark.slow
def test_a_resume_at_another_global_batch_takes_its_scaled_lr(data, tmp_path: Path):
    """optim.lr_reference_batch: the peak lr follows the global batch, on resume too (the checkpoint brings
    the schedule's step, not its rates). One rank: 2 clips a step to step 4, then resumed at 4 a step."""
    out = tmp_path / "run"
    optim = ["optim.lr=1e-3", "optim.lr_reference_batch=2", "optim.warmup_steps=2", "optim.total_steps=8"]
    first = tiny_mae_args(data, out, *optim, "run.steps=4", "run.checkpoint_every=4")
    then = [*tiny_mae_args(data, out, *optim, "run.steps=8", "data.batch_size=4"), "--resume", "auto"]
    texts = []
    for args in (first, then):
        run = subprocess.run(
            [*LVMAE, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        texts.append(run.stdout)
    assert "batch 2/rank, peak lr 0.001," in texts[0] and "batch 4/rank, peak lr 0.002," in texts[1]
    cfg = OptimConfig(lr=1e-3, lr_reference_batch=2, min_lr=1e-5, warmup_steps=2, total_steps=8)
    logged = {step: lr for step, _, lr in losses(out)}
    assert sorted(logged) == list(range(1, 9))
    for step, lr in logged.items():  # the lr a step ran at: the schedule's before it
        assert lr == pytest.approx(lr_at(step - 1, scaled_optim(cfg, 2 if step <= 4 else 4)), rel=1e-12)
