"""bench/gpu_check.py's `train` section: local shards made on the spot, then a 1-device `lvmae train mae`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gpu_check_common import REPO, Clock, Context, error_text, say, tokenizer_config


def run_cmd(ctx: Context, cmd: list[str], timeout: float, label: str) -> tuple[str, float]:
    """Run a command (its own process group, killed whole on timeout or error) -> (output, seconds);
    RuntimeError with the output's tail when it fails. Its output goes into the log."""
    say(f"{label}: {' '.join(cmd[:8])}{' ...' if len(cmd) > 8 else ''}")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1.0))
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        ctx.log(f"=== {label} (stopped): {' '.join(cmd)}\n{out}")
        raise
    seconds = time.perf_counter() - start
    ctx.log(f"=== {label} ({seconds:.1f} s, exit {proc.returncode}): {' '.join(cmd)}\n{out}")
    if proc.returncode != 0:
        raise RuntimeError(f"{label} exited with {proc.returncode}: ...{out[-2500:]}")
    return out, seconds


def read_train_log(run: Path, skip: int, batch: int) -> dict[str, Any]:
    """Rates and the data-wait share from RUN/train_log.jsonl, the first `skip` steps left out."""
    from train.runlog import read_log

    records = read_log(run / "train_log.jsonl")
    kept = records[skip:] if len(records) > skip else records
    wait = sum(r["data_wait_s"] for r in kept)
    compute = sum(r["compute_s"] for r in kept)
    total = max(wait + compute, 1e-9)
    steps = [r["data_wait_s"] + r["compute_s"] for r in kept]
    return {
        "steps_logged": len(records),
        "steps_counted": len(kept),
        "skipped_first_steps": len(records) - len(kept),
        "steps_per_s": round(len(kept) / total, 4),
        "clips_per_s": round(len(kept) * batch / total, 3),
        "median_step_s": round(statistics.median(steps), 4) if steps else None,
        "data_wait_share": round(wait / total, 4),
        "data_wait_s": round(wait, 3),
        "compute_s": round(compute, 3),
        "first_step_data_wait_s": records[0]["data_wait_s"] if records else None,
        "first_step_compute_s": records[0]["compute_s"] if records else None,
        "losses": [round(r["loss"], 4) for r in records],
    }


def section_train(rec: dict[str, Any], clock: Clock, ctx: Context) -> None:
    from lvmae.tokenizer import Tokenizer, save_tokenizer

    s = ctx.settings
    lvmae = [sys.executable, "-m", "lvmae_cli"]
    work = ctx.work / "train"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rec["decoder"] = "pyav"

    # 1. source videos: `lvmae ingest synth` (the `color` task) in parallel processes, one video each
    say(f"train: {s.videos} videos of {s.video_frames} frames at {s.video_size} px")
    start = time.perf_counter()
    procs = []
    for i in range(s.videos):
        cmd = [*lvmae, "ingest", "synth", str(work / "videos" / f"v{i}"), "--task", "color", "--num", "1"]
        cmd += ["--frames", str(s.video_frames), "--size", str(s.video_size), "--seed", str(i), "--quiet"]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(clock.left(), 1))
            if p.returncode != 0:
                raise RuntimeError(f"lvmae ingest synth exited with {p.returncode}: {out[-2000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    rec["synth_s"] = round(time.perf_counter() - start, 2)
    manifests = sorted(str(p) for p in (work / "videos").glob("v*/manifest.csv"))

    # 2. clip shards
    data = work / "data"
    cmd = [*lvmae, "ingest", "clips", *manifests, "--out", str(data), "--frames", str(s.clip_frames)]
    cmd += [
        "--size",
        str(s.clip_size),
        "--clip-stride",
        str(s.clip_stride),
        "--shard-clips",
        str(s.shard_clips),
    ]
    cmd += ["--workers", str(s.workers), "--quiet"]
    _, seconds = run_cmd(ctx, cmd, clock.left(), "ingest clips")
    index = json.loads((data / "index.json").read_text())
    clips = int(index.get("num_samples", sum(sh["samples"] for sh in index["shards"])))
    rec["ingest_clips"] = {
        "clips": clips,
        "shards": len(index["shards"]),
        "frames": s.clip_frames,
        "size": s.clip_size,
        "seconds": round(seconds, 2),
        "clips_per_s": round(clips / seconds, 3),
    }
    ctx.save()

    # 3. a fresh (untrained) tokenizer of the recipe's size: its codes and priorities are the targets
    torch.manual_seed(0)
    tid = save_tokenizer(Tokenizer(tokenizer_config(s.tokenizer_recipe)).eval(), work / "tokenizer")
    rec["tokenizer"] = {"recipe": s.tokenizer_recipe, "id": tid, "trained": False}

    # 4. its token store, on the device: at ingest tokens' default batch (8) first; a batch of 8 clips
    # of 128 x 224 px puts more than 2^31 elements in the tokenizer's first feature maps, which some
    # CUDA kernels refuse (32-bit index math): then smaller batches, the failure recorded
    stage: dict[str, Any] = {"attempts": []}
    rec["ingest_tokens"] = stage
    for batch in dict.fromkeys(b for b in (s.tokenizer_batch, 4, 1) if b <= s.tokenizer_batch):
        cmd = [*lvmae, "ingest", "tokens", str(data), "--tokenizer", str(work / "tokenizer"), "--quiet"]
        cmd += ["--device", ctx.device.type, "--batch-size", str(batch), "--workers", str(s.workers)]
        try:
            out, seconds = run_cmd(ctx, cmd, clock.left(), f"ingest tokens (batch {batch})")
        except RuntimeError as err:
            stage["attempts"].append({"batch": batch, "error": error_text(err)})
            ctx.save()
            continue
        m = re.search(r"tokens: (\d+) clips tokenized.* in ([0-9.]+) s on (\S+)", out)
        n, own = (int(m.group(1)), float(m.group(2))) if m else (clips, seconds)
        stage["attempts"].append({"batch": batch, "ok": True})
        stage.update(
            batch=batch,
            clips=n,
            seconds=round(own, 2),
            process_seconds=round(seconds, 2),
            device=m.group(3) if m else ctx.device.type,
            clips_per_s=round(n / max(own, 1e-9), 3),
            note="decode (PyAV, --workers threads) + tokenizer + Zarr writes, as `lvmae ingest tokens` "
            "reports its own time (tokenizer load included)",
        )
        break
    else:
        raise RuntimeError(f"lvmae ingest tokens failed at every batch size: {stage['attempts']}")
    ctx.save()

    # 5. `lvmae train mae` on one device, from those shards and tokens
    run = work / "run"
    overrides = [
        f"data.url={data}",
        f"data.tokens={tid}",
        "data.decoder=pyav",
        "data.shuffle_buffer=16",
        f"run.out={run}",
        f"run.steps={s.train_steps}",
        "run.checkpoint_every=0",
        "run.metrics_port_base=0",
        "run.log_every=5",
        "optim.warmup_steps=5",
    ]
    recipe = REPO / "configs" / f"{s.mae_recipe}.yaml"
    cmd = [*lvmae, "train", "mae", str(recipe), *overrides]
    out, seconds = run_cmd(ctx, cmd, clock.left(), "train mae")
    from train.config import load_train_config
    from train.memory import plan_step

    cfg = load_train_config([recipe], overrides)
    summary = json.loads((run / "summary.json").read_text())
    figures = read_train_log(run, s.skip_steps, cfg.data.batch_size)
    plan = plan_step(cfg, world_size=1, gpu_decode=False)
    peak = summary.get("peak_memory", {})
    rec["train"] = {
        "recipe": s.mae_recipe,
        "overrides": overrides,
        "batch": cfg.data.batch_size,
        "precision": summary.get("precision", cfg.run.precision),
        "zero_stage": cfg.run.zero_stage,
        "activation_checkpointing": cfg.run.activation_checkpointing,
        "process_seconds": round(seconds, 2),
        "run_seconds": summary.get("seconds"),
        "summary_clips_per_s": summary.get("clips_per_s"),
        **figures,
        "peak_memory": peak,
        "plan_total_bytes": plan.total,
        "plan_parts": dict(plan.parts),
        "peak_over_plan": round(peak["bytes"] / plan.total, 4) if peak.get("kind") == "cuda" else None,
        "compared": "peak_memory: the run's torch.cuda.max_memory_allocated() over every step, the final "
        "checkpoint and the export, against plan_step(cfg, world_size=1, gpu_decode=False).total (PyAV "
        "decodes on the host)",
        "loader": summary.get("loader"),
        "output_tail": out[-1500:],
    }
