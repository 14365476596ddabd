"""Everything GPU in one short run: one JSON of figures for the first session that is lent a GPU.

    bash bench/gpu_check.sh --out "$OUT"                                 # on the GPU machine (< 8 min)
    .venv/bin/python bench/gpu_check.py --device cpu --quick --out DIR   # the CPU fallback (the tests)

Sections, in this order, each with its own time budget (over it, the section stops and says so), each
recorded with the seconds it took and its figures or an "error"; the JSON is rewritten after every
section (and every item inside one), so one that fails or runs out of time leaves the others' figures:

  env        torch, CUDA, the device, whether bf16 runs (is_bf16_supported and a real bf16 matmul), an
             8192^3 bf16 matmul's TFLOP/s, the versions of the packages the run imports; DALI's wheel
             cannot travel to that machine, so every clip there is decoded with PyAV (data.decoder=pyav).
  step       the bare model (bench/fig1_memory.py's build: ViT-B, 128 frames, 224 px) in bf16 weights, as
             DeepSpeed's bf16 runs it (no autocast), for decoder `all`, 0.5 and 0.15, batch 1 and 8: step
             time, peak memory increase, saved-for-backward bytes, FLOPs and MFU, each beside the memory
             plan's prediction (train.memory); then the real DeepSpeed engine on the vitb_128f recipe
             (bench/train_step.py, a fresh process): its peak against plan_step(cfg).total.
  train      a 1-GPU `lvmae train mae configs/vitb_128f.yaml` run of 30 steps from local shards made here
             (`lvmae ingest synth` -> `ingest clips` 128 x 224 -> a fresh, untrained 128-frame tokenizer ->
             `ingest tokens` on the GPU), decoded with PyAV: steps/s, clips/s, the data-wait share.
  tokenizer  the 128-frame tokenizer's (configs/tokenizer_128f.yaml) clips/s on the GPU as `lvmae ingest
             tokens` runs it (bf16 autocast, codes and priorities back to the host), on random clips, at
             batch 1, 4 and 8; beside it, the train section's whole `ingest tokens` stage (PyAV included).

--quick shrinks every section to seconds (tiny preset, 16 frames, fp32, the demo recipes): what the test
suite runs on a CPU so that the script cannot rot. Writes OUT/gpu_check_<device>.json and a log beside it.
"""

# This file is the driver (options, the section table, budgets, the JSON after each section); each
# section lives in its own module beside it: gpu_check_env, gpu_check_step, gpu_check_train and
# gpu_check_tokenizer, with what they share in gpu_check_common.

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import gpu_check_env  # noqa: E402
import gpu_check_step  # noqa: E402
import gpu_check_tokenizer  # noqa: E402
import gpu_check_train  # noqa: E402
import torch  # noqa: E402
from fig1_memory import machine_info  # noqa: E402
from gpu_check_common import (  # noqa: E402
    REPO,
    Clock,
    Context,
    SectionTimeout,
    Settings,
    error_text,
    release_memory,
    say,
)

GIB = 2**30
GRACE_S = 10  # a section's hard stop comes this long after its budget (the soft checks come first)

FULL = Settings(
    preset="base",
    frames=128,
    batches=(1, 8),
    decoders=("all", "0.5", "0.15"),
    bf16=True,
    warmup=2,
    timed=5,
    matmul_n=8192,
    engine_recipe="vitb_128f",
    engine_steps=3,
    videos=8,
    video_frames=256,
    video_size=224,
    clip_frames=128,
    clip_size=224,
    clip_stride=32,
    shard_clips=8,
    workers=8,
    tokenizer_recipe="tokenizer_128f",
    mae_recipe="vitb_128f",
    train_steps=30,
    skip_steps=2,
    tokenizer_batch=8,
    tokenizer_batches=(1, 4, 8),
    tokenizer_timed=3,
    budgets=(("env", 20), ("step", 130), ("train", 190), ("tokenizer", 50)),
)
QUICK = Settings(
    preset="tiny",
    frames=16,
    batches=(1, 2),
    decoders=("all", "0.5", "0.15"),
    bf16=False,
    warmup=1,
    timed=2,
    matmul_n=512,
    engine_recipe="demo_cpu",
    engine_steps=1,
    videos=2,
    video_frames=32,
    video_size=64,
    clip_frames=16,
    clip_size=64,
    clip_stride=8,
    shard_clips=4,
    workers=2,
    tokenizer_recipe="tokenizer_demo_cpu",
    mae_recipe="demo_cpu",
    train_steps=6,
    skip_steps=2,
    tokenizer_batch=4,
    tokenizer_batches=(1, 4),
    tokenizer_timed=2,
    budgets=(("env", 30), ("step", 90), ("train", 150), ("tokenizer", 30)),
)


# The sections, in the order they run: each fills its record (rec) within its clock's budget.
RUNNERS: dict[str, Callable[[dict[str, Any], Clock, Context], None]] = {
    "env": gpu_check_env.section_env,
    "step": gpu_check_step.section_step,
    "train": gpu_check_train.section_train,
    "tokenizer": gpu_check_tokenizer.section_tokenizer,
}
SECTIONS = tuple(RUNNERS)


@contextlib.contextmanager
def hard_stop(seconds: float):
    """Raise SectionTimeout in this (main) thread after `seconds`: the section's hard limit."""

    def on_alarm(signum, frame):
        raise SectionTimeout(f"stopped after {seconds:.0f} s (its budget plus {GRACE_S} s)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_section(name: str, budget: float, ctx: Context) -> None:
    rec: dict[str, Any] = {"budget_s": budget}
    ctx.result["sections"][name] = rec
    clock = Clock(budget)
    say(f"section {name} (budget {budget:.0f} s)")
    try:
        with hard_stop(budget + GRACE_S):
            RUNNERS[name](rec, clock, ctx)
    except Exception as err:  # SectionTimeout included: the figures so far stay
        rec["error"] = error_text(err)
        rec["traceback"] = traceback.format_exc()[-4000:]
        ctx.log(f"=== section {name} failed\n{traceback.format_exc()}")
    finally:
        rec["seconds"] = round(clock.elapsed(), 2)
        release_memory()
        ctx.save()
    say(f"section {name}: {rec['seconds']} s" + (f", error: {rec['error'][:300]}" if "error" in rec else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu", "auto"), default="auto")
    p.add_argument("--quick", action="store_true", help="every section in seconds (the CPU fallback)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--work", default=None, help="scratch folder (default: a fresh one in the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: --device cuda, but CUDA is not available here (use --device cpu --quick)",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    settings = QUICK if args.quick else FULL
    if device.type == "cpu" and not args.quick:
        say("warning: the full settings (ViT-B, 128 frames) on a CPU run far past every budget: use --quick")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lvmae-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    name = f"gpu_check_{device.type}"
    ctx = Context(
        device=device,
        settings=settings,
        quick=args.quick,
        work=work,
        json_path=out / f"{name}.json",
        log_path=out / f"{name}.log",
        result={},
    )
    ctx.log_path.write_text("")
    started = time.perf_counter()
    ctx.result.update(
        script="bench/gpu_check.py",
        argv=sys.argv[1:] if argv is None else argv,
        quick=args.quick,
        machine=machine_info(device),
        settings=dataclasses.asdict(settings),
        sections={},
    )
    ctx.save()
    budgets = dict(settings.budgets)
    try:
        for section in SECTIONS:
            if section in args.sections:
                run_section(section, budgets[section], ctx)
    finally:
        ctx.result["wall_s"] = round(time.perf_counter() - started, 1)
        ctx.result["failed_sections"] = [k for k, v in ctx.result["sections"].items() if "error" in v]
        ctx.save()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    say(f"done in {ctx.result['wall_s']} s: {ctx.json_path}")
    try:
        print(summary_text(ctx.result))
    except Exception as err:  # the JSON is written: a summary that trips must not hide it
        print(f"gpu_check: no summary ({error_text(err)}); the figures are in {ctx.json_path}")
    return 0


def summary_text(result: dict[str, Any]) -> str:
    """A few lines of the figures, for the run tool's output tail."""
    lines = []
    sec = result["sections"]
    env = sec.get("env", {})
    if "device_name" in env:
        lines.append(
            f"env: {env['device_name']}, torch {env.get('torch')}, bf16 ok {env.get('bf16_matmul_ok')}, "
            f"matmul {env.get('matmul', {}).get('tflops_per_s')} TFLOP/s"
        )
    for r in sec.get("step", {}).get("runs", []):
        if "step_s" in r:
            lines.append(
                f"step {r['decoder']:>4} b{r['batch']}: {r['step_s'] * 1e3:.1f} ms, {r['tflops_per_s']} TFLOP/s, "
                f"mfu {r.get('mfu')}, peak +{r['peak_increase_bytes'] / GIB:.2f} GiB "
                f"(plan {r['plan_peak_increase_bytes'] / GIB:.2f}), saved {r['saved_activation_bytes'] / GIB:.3f} "
                f"GiB (plan {r['plan_saved_bytes'] / GIB:.3f})"
            )
    eng = sec.get("step", {}).get("engine", {})
    if "peak_memory_bytes" in eng:
        lines.append(
            f"engine {eng['recipe']} b{eng['batch']}: {eng['median_step_s']} s/step, peak "
            f"{eng['peak_memory_bytes'] / GIB:.2f} GiB (plan {eng['plan_total_bytes'] / GIB:.2f})"
        )
    for attempt in sec.get("train", {}).get("ingest_tokens", {}).get("attempts", []):
        if "error" in attempt:
            lines.append(f"ingest tokens batch {attempt['batch']}: ERROR {attempt['error'][:300]}")
    tr = sec.get("train", {}).get("train", {})
    if tr:
        lines.append(
            f"train: {tr['steps_per_s']} steps/s, {tr['clips_per_s']} clips/s, data wait {tr['data_wait_share']}"
        )
    tok = sec.get("tokenizer", {})
    if "clips_per_s" in tok:
        lines.append(
            f"tokenizer: best {tok['clips_per_s']} clips/s ("
            + ", ".join(
                f"b{r['batch']}: {str(r.get('clips_per_s', r.get('error', r.get('skipped'))))[:150]}"
                for r in tok["runs"]
            )
            + f"); ingest tokens stage {tok.get('ingest_tokens_clips_per_s')} clips/s"
        )
    for name, rec in sec.items():
        if "error" in rec:
            lines.append(f"{name}: ERROR {rec['error'][:400]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
