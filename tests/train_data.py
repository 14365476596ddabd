"""A tiny training data set for trainer and monitoring tests: 8-frame 32 px VP9 clips of the four real
sample videos, with the token store of a freshly initialised tokenizer (8 px patches: 4 x 4 x 4 tokens)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.tokens import ingest_tokens
from lvmae.config import VideoSpec
from lvmae.tokenizer import Tokenizer, save_tokenizer
from lvmae.tokenizer_config import TokenizerConfig
from train.runlog import read_log

REPO = Path(__file__).resolve().parents[1]
LVMAE = [sys.executable, "-m", "lvmae_cli"]
VIDEO = ["model.video.num_frames=8", "model.video.img_size=32", "model.video.patch_size=8"]


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, sample_videos) -> tuple[Path, str]:
    """(the data set's root, the id of its token set)."""
    root = tmp_path_factory.mktemp("train")
    spec = ClipSpec(num_frames=8, size=32)
    sources = [str(p) for p in sample_videos.values()]
    summary = ingest_clips(
        sources, str(root / "data"), IngestConfig(clip=spec, shard_clips=8), progress=False
    )
    assert summary.num_samples >= 40
    torch.manual_seed(0)
    tok = TokenizerConfig(
        video=VideoSpec(num_frames=8, img_size=32, patch_size=8),
        base_channels=8,
        channel_mult=[1, 1, 2, 2],
        num_groups=4,
        scorer_channels=8,
        fsq_levels=[8, 5, 5],
    )
    tid = save_tokenizer(Tokenizer(tok).eval(), root / "tokenizer")
    ingest_tokens(str(root / "data"), str(root / "tokenizer"), device="cpu", progress=False)
    return root / "data", tid


def tiny_mae_args(data: tuple[Path, str], out: Path, *extra: str) -> list[str]:
    """`train mae` on the demo recipe, shrunk to the tiny data set (overrides in `extra` win)."""
    url, tid = data
    return [
        "train",
        "mae",
        str(REPO / "configs/demo_cpu.yaml"),
        *VIDEO,
        "model.target.fsq_levels=[8,5,5]",
        f"data.url={url}",
        f"data.tokens={tid}",
        "data.batch_size=2",
        "data.shuffle_buffer=8",
        "optim.warmup_steps=3",
        "run.keep_last=2",
        "run.metrics_port_base=0",
        f"run.out={out}",
        *extra,
    ]


# ---- running `lvmae launch` in tests ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mae_args(data: tuple[Path, str], out: Path, *extra: str) -> list[str]:
    return tiny_mae_args(data, out, "run.steps=12", "run.checkpoint_every=4", *extra)


def launch(args: list[str], launcher: str = "deepspeed", nproc: int = 2, **kw) -> subprocess.Popen:
    cmd = [
        *LVMAE,
        "launch",
        f"--launcher={launcher}",
        f"--nproc={nproc}",
        f"--master-port={free_port()}",
        "--",
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the launcher's ranks run in sessions of their own: a group kill misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_9_all(proc: subprocess.Popen) -> None:
    """kill -9 of a whole run: the launcher and every rank, at once."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, seconds: float = 240) -> None:
    """Until the run in `out` has logged `step` (it must still be running then, to be interrupted)."""
    log, deadline = out / "train_log.jsonl", time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and any(r["step"] >= step for r in read_log(log)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before step {step}:\n" + proc.stdout.read()[-3000:]


def losses(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_log(out / "train_log.jsonl")]


@pytest.fixture(scope="session")
def uninterrupted(train_data, tmp_path_factory) -> Path:
    """The reference run: 12 steps on 2 ranks, checkpoints every 4, never interrupted (shared by the
    resume, outage, remote-run and elastic tests, which must reproduce its losses and, with its sample log,
    its data)."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    finish(launch(mae_args(train_data, out, "run.sample_log=true")))
    return out
