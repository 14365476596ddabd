"""run.out on object storage (train.rundir, train.checkpoint.StoredCheckpoints) against a real local S3
server (SeaweedFS): no mocks, and no local folder that the ranks share.

The training runs are the trainer tests' tiny 2-rank MAE (tests/test_train.py); each rank stages its files
in a folder of its own (run.stage_dir=.../stage-{rank}), as ranks on different nodes would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import s3fs
import torch
from safetensors.torch import load_file
from train_data import LVMAE, REPO, finish, kill_9_all, launch, tiny_mae_args

from ingest.objectstore import LocalS3Server
from train.checkpoint import STALL_ENV, CheckpointError, StoredCheckpoints, file_owner
from train.rundir import RunDir, default_stage_dir, fetch_folder, is_url
from train.runlog import read_log

STEP4, STEP8, STEP12 = "step-00000004", "step-00000008", "step-00000012"


def s3_env(server: LocalS3Server) -> dict[str, str]:
    """The environment of a process that reaches the server: endpoint and keys as botocore reads them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | {
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture
def in_env(s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process reaches the server through the environment, as `lvmae train` does."""
    for key, value in s3_env(s3_server).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)


def test_file_owner_and_stage_defaults():
    assert file_owner("zero_pp_rank_3_mp_rank_00_model_states.pt") == 3
    assert file_owner("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert file_owner("rank-00001.json") == 1
    assert [file_owner(n) for n in ("mp_rank_00_model_states.pt", "meta.json", "config.yaml")] == [None] * 3
    assert is_url("s3://b/runs/x") and not is_url("runs/x") and not is_url("file:///tmp/x")
    stage = default_stage_dir("s3://b/runs/x")
    assert stage.name.startswith("x-") and stage == default_stage_dir("s3://b/runs/x/")
    assert stage != default_stage_dir("s3://other/runs/x")
    local = RunDir("runs/x", "ignored")
    assert not local.remote and local.local == Path("runs/x") and local.uri("a.json") == "runs/x/a.json"
    assert local.upload("a.json") == 0.0  # a local run uploads nothing
    assert RunDir("s3://b/r", "/st/{node}-{rank}", rank=3, node=1).local == Path("/st/1-3")


def test_run_dir_uploads_downloads_and_removes(s3_bucket, in_env, tmp_path: Path):
    url, options = s3_bucket
    run = RunDir(f"{url}/runs/a", str(tmp_path / "stage"))
    (run.local / "export").mkdir(parents=True)
    (run.local / "export" / "model.safetensors").write_bytes(b"w" * 1000)
    (run.local / "export" / "config.yaml").write_text("a: 1\n")
    (run.local / "summary.json").write_text("{}\n")
    assert run.upload("summary.json") >= 0 and run.upload_tree("export") >= 0
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    bucket = url.removeprefix("s3://")
    assert sorted(fs.find(f"{url}/runs/a")) == [
        f"{bucket}/runs/a/export/config.yaml",
        f"{bucket}/runs/a/export/model.safetensors",
        f"{bucket}/runs/a/summary.json",
    ]
    assert run.uri("export") == f"{url}/runs/a/export"
    assert run.where(run.local / "export") == f"{url}/runs/a/export"
    assert run.list("") == ["export", "summary.json"] and run.exists("export/config.yaml")

    shutil.rmtree(run.local)
    assert run.download("summary.json") and not run.download("nothing.json")
    assert run.download_tree("export") == 2
    assert (run.local / "export" / "model.safetensors").read_bytes() == b"w" * 1000
    assert not [p for p in run.local.rglob("*.tmp-*")]  # downloads land by rename
    fetched = fetch_folder(f"{url}/runs/a/export", tmp_path / "fetched")
    assert sorted(p.name for p in fetched.iterdir()) == ["config.yaml", "model.safetensors"]

    run.remove("export")
    assert run.list("") == ["summary.json"] and not run.exists("export/config.yaml")


def test_stored_checkpoints_commit_marker_stale_uploads_and_resume_names(s3_bucket, in_env, tmp_path: Path):
    """meta.json makes a step a checkpoint; `latest` names one; steps without meta.json are unfinished
    uploads, never resumed from and removed at the next start."""
    url, options = s3_bucket
    run = RunDir(f"{url}/r", str(tmp_path / "stage"))
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    ck = f"{url}/r/checkpoints"
    for step in (STEP4, STEP8):
        fs.pipe(f"{ck}/{step}/zero_pp_rank_0_mp_rank_00_model_states.pt", b"x")
        fs.pipe(f"{ck}/{step}/meta.json", b'{"step": 1, "world_size": 1}')
    fs.pipe(f"{ck}/{STEP12}/zero_pp_rank_0_mp_rank_00_model_states.pt", b"half")  # a killed upload
    fs.pipe(f"{ck}/latest", f"{STEP4}\n".encode())
    ckpts = StoredCheckpoints(run, rank=0, world_size=1, keep_last=2)
    assert ckpts.steps() == [4, 8]
    assert ckpts.latest() == run.local / "checkpoints" / STEP4  # as `latest` says
    fs.pipe(f"{ck}/latest", f"{STEP12}\n".encode())  # a pointer to an unfinished step is not followed
    assert ckpts.latest() == run.local / "checkpoints" / STEP8
    assert ckpts.where(ckpts.latest()) == f"{ck}/{STEP8}" and ckpts.location == ck
    assert ckpts.named(f"{ck}/{STEP4}") == run.local / "checkpoints" / STEP4
    for bad in (f"{ck}/{STEP12}", "/elsewhere/step-00000004"):
        with pytest.raises(CheckpointError, match="not a complete checkpoint of this run"):
            ckpts.named(bad)
    assert ckpts.remove_stale() == [STEP12]
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(ck)) == ["latest", STEP4, STEP8]


def test_stored_checkpoints_spare_the_best_one(s3_bucket, in_env, tmp_path: Path):
    """run.keep_best on object storage: best.json lives on the store, and pruning spares its step."""
    url, options = s3_bucket
    run = RunDir(f"{url}/b", str(tmp_path / "stage"))
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    ck = f"{url}/b/checkpoints"
    for step in (STEP4, STEP8, STEP12):
        fs.pipe(f"{ck}/{step}/meta.json", b'{"step": 1, "world_size": 1}')
    ckpts = StoredCheckpoints(run, rank=0, world_size=1, keep_last=1)
    assert ckpts.read_best() is None
    ckpts.set_best({"step": 4, "checkpoint": STEP4, "knn_top1": 0.75})
    assert ckpts.steps() == [4, 12]  # 8 pruned (keep_last=1), 4 kept as the best
    reopened = StoredCheckpoints(run, rank=0, world_size=1, keep_last=1)
    assert reopened.read_best() == {"step": 4, "checkpoint": STEP4, "knn_top1": 0.75}
    ckpts.set_best({"step": 12, "checkpoint": STEP12, "knn_top1": 0.8})
    assert ckpts.steps() == [12]  # the old best goes once another one replaces it


def test_a_store_refusing_the_keys_is_one_clear_line(s3_server, s3_bucket, train_data, tmp_path: Path):
    url, _ = s3_bucket
    env = s3_env(s3_server) | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    args = remote_args(train_data, f"{url}/r", tmp_path)
    run = subprocess.run([*LVMAE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"cannot read {url}/r/checkpoints (PermissionError" in errors[0], errors
    assert "not-the-secret" not in run.stdout + run.stderr
    assert not list(tmp_path.rglob("*.yaml"))  # nothing written


# --- training runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(s3_server: LocalS3Server) -> Iterator[str]:
    name = f"runs-{uuid.uuid4().hex[:8]}"
    yield s3_server.create_bucket(name)
    s3_server.delete_bucket(name)


def remote_args(train_data: Any, out: str, stage: Path, *extra: str) -> list[str]:
    args = tiny_mae_args(train_data, Path("unused"), "run.steps=12", "run.checkpoint_every=4", *extra)
    return [a for a in args if not a.startswith("run.out=")] + [
        f"run.out={out}",
        f"run.stage_dir={stage}/stage-{{rank}}",  # one folder per rank: nothing local is shared
    ]


def upload_times(text: str) -> list[float]:
    return [float(s) for s in re.findall(r"^checkpoint s3://\S+ \(uploaded in ([\d.]+) s\)$", text, re.M)]


def store_log(fs: s3fs.S3FileSystem, url: str, tmp: Path) -> list[tuple[int, float, float]]:
    fs.get(f"{url}/train_log.jsonl", str(tmp / "log.jsonl"))
    return [(r["step"], r["loss"], r["lr"]) for r in read_log(tmp / "log.jsonl")]


@pytest.fixture(scope="module")
def straight(s3_server, bucket, train_data, tmp_path_factory) -> dict[str, Any]:
    """One uninterrupted 12-step run with run.out on the store: checkpoints at 4, 8, 12, the last 2 kept."""
    tmp = tmp_path_factory.mktemp("remote")
    url = f"{bucket}/runs/straight"
    started = time.perf_counter()
    text = finish(launch(remote_args(train_data, url, tmp), env=s3_env(s3_server)))
    return {"url": url, "stage": tmp, "text": text, "seconds": time.perf_counter() - started}


@pytest.mark.slow
def test_a_run_on_object_storage_writes_everything_to_the_store(
    s3_server, straight, in_env, tmp_path, monkeypatch
):
    url, stage = straight["url"], straight["stage"]
    fs = s3_server.filesystem()
    bucket_path = url.removeprefix("s3://")
    files = {p.removeprefix(bucket_path + "/") for p in fs.find(url)}
    assert {"config.yaml", "train_log.jsonl", "summary.json", "export/model.safetensors"} <= files
    assert "export/config.yaml" in files and not [f for f in files if ".tmp-" in f]
    assert fs.cat(f"{url}/checkpoints/latest").decode().strip() == STEP12
    steps = {f.split("/")[1] for f in files if f.startswith("checkpoints/step-")}
    assert steps == {STEP8, STEP12}  # keep_last=2: step 4 pruned from the store
    step12 = {f.rsplit("/", 1)[-1] for f in files if f.startswith(f"checkpoints/{STEP12}/")}
    assert {"meta.json", "config.yaml", "rank-00000.json", "rank-00001.json"} <= step12
    assert {file_owner(f) for f in step12} == {None, 0, 1}  # both ranks' ZeRO shards
    assert [s for s, _, _ in store_log(fs, url, tmp_path)] == list(range(1, 13))
    summary = json.loads(fs.cat(f"{url}/summary.json"))
    assert summary["steps"] == 12 and summary["export"] == f"{url}/export"
    assert "password" not in fs.cat(f"{url}/config.yaml").decode().lower()

    # Each rank's stage holds its own files only; rank 1's has no run files and no rank-0 shards.
    rank1 = stage / "stage-1"
    assert not (rank1 / "config.yaml").exists() and not (rank1 / "train_log.jsonl").exists()
    local_steps = sorted(p.name for p in (rank1 / "checkpoints").glob("step-*"))
    assert local_steps == [STEP8, STEP12]  # local copies pruned too
    assert {file_owner(p.name) for p in (rank1 / "checkpoints" / STEP12).iterdir()} == {1}

    times = upload_times(straight["text"])
    assert len(times) == 3, straight["text"][-3000:]
    print(f"\nupload per checkpoint (s): {times}; run {straight['seconds']:.1f} s")

    # `lvmae eval probe` (and finetune.init_from) read a run on the store: its export, or a checkpoint.
    from train.pretrained import load_pretrained

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the fetched files' stage: not the real /tmp
    cfg, exported, what = load_pretrained(url)
    assert what == f"export {url}/export" and cfg.video.num_frames == 8
    _, rebuilt, what = load_pretrained(f"{url}/checkpoints/{STEP12}")
    assert what == f"checkpoint {url}/checkpoints/{STEP12}"
    assert set(rebuilt) == set(exported) and all(torch.equal(rebuilt[k], exported[k]) for k in rebuilt)


@pytest.mark.slow
def test_kill_9_during_an_upload_then_resume_from_the_store(
    s3_server, bucket, straight, train_data, tmp_path
):
    """kill -9 while step 8 is half uploaded: the store keeps step 4 and `latest`; a resume on fresh stage
    folders fetches step 4, drops the half upload and trains to exactly the uninterrupted run's losses.
    Then the run goes on on one rank from the store (train.elastic)."""
    url = f"{bucket}/runs/killed"
    fs = s3_server.filesystem()
    env = s3_env(s3_server)
    proc = launch(
        remote_args(train_data, url, tmp_path / "first"), launcher="torchrun", env={**env, STALL_ENV: "8"}
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if fs.exists(f"{url}/checkpoints/{STEP8}") and fs.ls(f"{url}/checkpoints/{STEP8}"):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()[-3000:]
    kill_9_all(proc)
    fs.invalidate_cache()
    assert not fs.exists(f"{url}/checkpoints/{STEP8}/meta.json")  # half uploaded: no commit
    assert fs.cat(f"{url}/checkpoints/latest").decode().strip() == STEP4

    shutil.rmtree(tmp_path / "first")  # nothing local survives: the store alone resumes
    args = [*remote_args(train_data, url, tmp_path / "second"), "--resume", "auto"]
    text = finish(launch(args, env=env))
    assert f"removed unfinished checkpoint saves: {STEP8}" in text, text[-3000:]
    assert f"resumed from {url}/checkpoints/{STEP4} at step 4" in text, text[-3000:]
    assert store_log(fs, url, tmp_path) == store_log(fs, straight["url"], tmp_path)
    fs.get(f"{url}/export/model.safetensors", str(tmp_path / "a.safetensors"))
    fs.get(f"{straight['url']}/export/model.safetensors", str(tmp_path / "b.safetensors"))
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fs.invalidate_cache()
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{url}/checkpoints"))
    assert steps == ["latest", STEP8, STEP12]
    assert fs.exists(f"{url}/checkpoints/{STEP8}/meta.json")
    print(f"\nupload per checkpoint after resume (s): {upload_times(text)}")

    # ... and on one rank (a node lost): step 12 fetched whole into a fresh stage, converted, 2 more steps
    args = [*remote_args(train_data, url, tmp_path / "third", "run.steps=14"), "--resume", "auto"]
    text = finish(launch(args, env=env, nproc=1))
    assert "written by 2 ranks, this run has 1: global batch 4 kept as 2 clips x 2 accumulation" in text
    assert [s for s, _, _ in store_log(fs, url, tmp_path)] == list(range(1, 15))
    fs.invalidate_cache()
    assert not [p for p in fs.ls(f"{url}/checkpoints") if "universal" in p]  # the scratch stays local


@pytest.mark.slow
def test_finetune_reads_its_encoder_from_the_store_and_writes_its_run_there(
    s3_server, s3_bucket, colour_data, tmp_path
):
    """finetune.init_from and run.out both on the store; the evaluation's eval.json and confusion.png
    (written after training, by `lvmae finetune`) land in the run folder on the store too."""
    url, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    for p in (colour_data / "export").iterdir():
        fs.put_file(str(p), f"{url}/pretrained/export/{p.name}")
    out = f"{url}/ft"
    cmd = [*LVMAE, "finetune", f"finetune.init_from={url}/pretrained", f"data.url={colour_data / 'data'}"]
    cmd += ["data.batch_size=4", "data.shuffle_buffer=16", "data.decoder=pyav", f"run.out={out}"]
    cmd += [f"run.stage_dir={tmp_path / 'stage'}", "run.metrics_port_base=0", "run.checkpoint_every=2"]
    cmd += ["run.steps=4", "optim.total_steps=4", "optim.warmup_steps=1"]
    env = s3_env(s3_server) | {"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # default stages in tmp
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fs.invalidate_cache()
    files = {p.removeprefix(out.removeprefix("s3://") + "/") for p in fs.find(out)}
    assert {"eval.json", "confusion.png", "summary.json", "train_log.jsonl", "config.yaml"} <= files
    assert {"export/model.safetensors", "export/classes.json", "export/config.yaml"} <= files
    assert {f.split("/")[1] for f in files if f.startswith("checkpoints/step-")} == {
        "step-00000002",
        "step-00000004",
    }
    results = json.loads(fs.cat(f"{out}/eval.json"))
    assert results["classifier"] == f"{out}/export" and results["test"]["num_clips"] == 9
    assert f"figures: {out}/eval.json" in run.stdout
