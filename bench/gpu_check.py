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
             plan's prediction (train.plan); then the real DeepSpeed engine on the vitb_128f recipe
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

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO), str(BENCH)]

import torch  # noqa: E402
from fig1_memory import (  # noqa: E402
    build,
    count_flops,
    machine_info,
    measure_step,
    register_cpu_sdpa_flops,
    result_row,
    train_step,
)

GIB = 2**30
GRACE_S = 10  # a section's hard stop comes this long after its budget (the soft checks come first)
SECTIONS = ("env", "step", "train", "tokenizer")
PACKAGES = (
    "torch",
    "numpy",
    "deepspeed",
    "pydantic",
    "omegaconf",
    "webdataset",
    "zarr",
    "numcodecs",
    "fsspec",
    "av",
    "safetensors",
    "prometheus-client",
    "botocore",
    "nvidia-dali-cuda120",
)
# Dense bf16 peak of the chips this project may be lent (NVIDIA's data sheets, without sparsity).
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


@dataclass(frozen=True)
class Settings:
    """How big each section runs: FULL on a GPU, QUICK for the CPU fallback."""

    # step
    preset: str
    frames: int
    batches: tuple[int, ...]
    decoders: tuple[str, ...]
    bf16: bool
    warmup: int  # untimed steps before the measured ones
    timed: int  # timed steps (median reported)
    matmul_n: int
    engine_recipe: str  # the DeepSpeed engine run (bench/train_step.py --one)
    engine_steps: int
    # train
    videos: int  # `lvmae ingest synth` processes, one video each, in parallel
    video_frames: int
    video_size: int
    clip_frames: int
    clip_size: int
    clip_stride: int
    shard_clips: int
    workers: int  # ingest clips processes, ingest tokens decode threads
    tokenizer_recipe: str
    mae_recipe: str
    train_steps: int
    skip_steps: int  # first steps left out of the rates (loader fill, warm-up)
    tokenizer_batch: int  # ingest tokens --batch-size (its default, 8, on the GPU)
    # tokenizer
    tokenizer_batches: tuple[int, ...]  # batch sizes timed in the tokenizer section
    tokenizer_timed: int
    budgets: tuple[tuple[str, float], ...]


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


class SectionTimeout(Exception):
    """A section ran past its budget plus GRACE_S."""


class Clock:
    """A section's time budget: what is left of it."""

    def __init__(self, budget: float):
        self.budget, self.start = budget, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


@dataclass
class Context:
    device: torch.device
    settings: Settings
    quick: bool
    work: Path
    json_path: Path
    log_path: Path
    result: dict[str, Any]

    def save(self) -> None:
        tmp = self.json_path.with_name(self.json_path.name + ".partial")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, self.json_path)

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.settings.bf16 else torch.float32


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:4000]


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


# ------------------------------------------------------------------------------------------------- env


def package_versions() -> dict[str, dict[str, str | None]]:
    """Each package's version and where Python imports it from (a carried wheel lands in /tmp/site)."""
    out = {}
    modules = {"prometheus-client": "prometheus_client", "nvidia-dali-cuda120": "nvidia.dali"}
    for dist in PACKAGES:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        try:
            spec = importlib.util.find_spec(modules.get(dist, dist))
        except ModuleNotFoundError:
            spec = None
        origin = spec.origin if spec is not None else None
        out[dist] = {"version": version, "from": str(Path(origin).parent) if origin else None}
    return out


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (mean of `reps` after 3 warm-ups)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), device=device, dtype=dtype, generator=gen)
    b = torch.randn((n, n), device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def section_env(rec: dict[str, Any], clock: Clock, ctx: Context) -> None:
    dev = ctx.device
    rec.update(
        python=sys.version.split()[0],
        executable=sys.executable,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_available=torch.cuda.is_available(),
        device=dev.type,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        rec.update(
            device_name=props.name,
            device_memory_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        rec.update(device_name=machine_info(dev)["device_name"], bf16_supported=None)
    # bf16 usable: a real bf16 matmul runs and agrees with float32 to bf16's precision
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn((256, 256), generator=gen), torch.randn((256, 256), generator=gen)
    ref = a @ b
    got = (a.to(dev, torch.bfloat16) @ b.to(dev, torch.bfloat16)).float().cpu()
    rel = float((got - ref).norm() / ref.norm())
    rec.update(
        bf16_matmul_rel_error=round(rel, 5), bf16_matmul_ok=bool(torch.isfinite(got).all()) and rel < 0.02
    )
    dtype = torch.bfloat16 if ctx.settings.bf16 else torch.float32
    n = ctx.settings.matmul_n
    rate = matmul_rate(dev, n, dtype, reps=10 if dev.type == "cuda" else 3)
    rec["matmul"] = {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "tflops_per_s": round(rate / 1e12, 2),
    }
    rec["packages"] = package_versions()
    dali = rec["packages"]["nvidia-dali-cuda120"]["version"]
    rec["decoder_used"] = "pyav"
    rec["dali"] = (
        "absent (its wheel is too large to carry to this machine): clips are decoded with PyAV "
        "(data.decoder=pyav), on the CPU"
        if dali is None
        else f"{dali} installed, not used: the check decodes with PyAV (data.decoder=pyav), as on a "
        "machine that cannot take DALI's wheel"
    )
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    rec["deepspeed_accelerator"] = get_accelerator()._name
    rec["deepspeed"] = deepspeed.__version__


# ------------------------------------------------------------------------------------------------ step


def peak_bf16(device: torch.device) -> tuple[float | None, str]:
    """(the chip's dense bf16 peak FLOP/s, what it is) for MFU; None off the known chips and on a CPU."""
    if device.type != "cuda":
        return None, "no bf16 peak on a CPU: MFU not computed"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"{key} dense bf16 peak (data sheet, no sparsity) for {name!r}"
    return None, f"unknown chip {name!r}: MFU not computed (see matmul_mfu for the measured rate)"


def plan_train_config(cfg: Any, batch: int, precision: str) -> Any:
    """A TrainConfig whose model is `cfg` (a resolved MAEConfig), with one bare-model step's settings:
    batch, precision, ZeRO-0 (gradients whole, in the training dtype), no checkpointing."""
    from lvmae.config import to_dict
    from train.config import load_train_config

    run = {"precision": precision, "zero_stage": 0, "activation_checkpointing": False}
    data = {"url": "synthetic", "tokens": "synthetic", "batch_size": batch}
    return load_train_config([{"model": to_dict(cfg), "data": data, "run": run}])


def bare_step(cfg, model, batch: int, ctx: Context, state: set[int]) -> dict[str, Any]:
    """One decoder setting at one batch size: measured step and the plan's prediction beside it."""
    from train.plan import activation_bytes, plan_step

    s, dev, dtype = ctx.settings, ctx.device, ctx.dtype
    gen = torch.Generator().manual_seed(batch)
    v = cfg.video
    video = torch.randn((batch, v.in_chans, v.num_frames, v.img_size, v.img_size), generator=gen)
    video = video.to(dev, dtype)
    plan = model.plan(batch, gen, torch.rand((batch, *v.grid), generator=gen), dev)
    step = lambda: train_step(cfg, model, video, plan, False)  # noqa: E731 (no autocast: bf16 weights)
    for _ in range(s.warmup):
        step()
    sync(dev)
    model.zero_grad(set_to_none=True)  # the baseline holds no gradients: the step allocates them
    mem = measure_step(step, dev, state)
    times = []
    for _ in range(s.timed):
        sync(dev)
        start = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - start)
    flops = count_flops(cfg, model, video, plan, False)
    step_s = statistics.median(times)
    row: dict[str, Any] = {
        "decoder": "all" if cfg.masking.decoder == "all" else str(cfg.masking.decoder_budget),
        "strategy": cfg.masking.decoder,
        "batch": batch,
        "tokens": v.num_tokens,
        "visible": plan.num_visible,
        "decoded": plan.num_selected,
        "decoder_seq": plan.num_visible + plan.num_selected,
        "step_s": round(step_s, 5),
        "step_s_all": [round(t, 5) for t in times],
        "measured_step_s": round(mem["seconds"], 5),
        "memory_method": mem["method"],
        "memory_before_bytes": mem["before_bytes"],
        "peak_increase_bytes": mem["peak_increase_bytes"],
        "saved_activation_bytes": mem["saved_activation_bytes"],
        "flops_total": flops["flops_total"],
        "flops_forward": flops["flops_forward"],
        "tflops_per_s": round(flops["flops_total"] / step_s / 1e12, 3),
        "sdpa_ops": flops["sdpa_ops"],  # the attention kernels that ran (their FLOPs are counted)
        "clips_per_s": round(batch / step_s, 3),
    }
    # The plan: saved bytes counted on the meta device; the step's peak increase predicted as the saved
    # activations + the backward's working set + the gradients (ZeRO-0: whole, in the training dtype).
    acts = activation_bytes(cfg, batch, dtype)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    train_cfg = plan_train_config(cfg, batch, precision)
    planned = plan_step(train_cfg, world_size=1, gpu_decode=False)
    predicted = sum(
        planned.parts[k] for k in ("activations (saved for backward)", "backward working set", "gradients")
    )
    row.update(
        plan_saved_bytes=acts.saved(False),
        saved_over_plan=round(mem["saved_activation_bytes"] / max(acts.saved(False), 1), 4),
        plan_peak_increase_bytes=predicted,
        peak_increase_over_plan=round(mem["peak_increase_bytes"] / max(predicted, 1), 4),
        plan_parts={k: planned.parts[k] for k in planned.parts},
        plan_decoded=planned.decoded,
        plan_model_matches=dataclasses.asdict(train_cfg.model_config()) == dataclasses.asdict(cfg),
    )
    return row


def engine_run(rec: dict[str, Any], clock: Clock, ctx: Context) -> dict[str, Any]:
    """The recipe through the real DeepSpeed engine (bench/train_step.py --one, a fresh process): its
    peak memory against the plan's total for the same config."""
    from train.config import load_train_config
    from train.plan import plan_step

    s = ctx.settings
    limit = int(max(10, clock.left() - 5))
    cmd = ["timeout", "-k", "5", str(limit), sys.executable, str(BENCH / "train_step.py")]
    cmd += ["--one", s.engine_recipe, "--steps", str(s.engine_steps)]
    say(f"step: DeepSpeed engine on {s.engine_recipe} ({s.engine_steps} steps after a warm-up, <= {limit} s)")
    try:
        row = result_row(cmd, f"train_step.py --one {s.engine_recipe}")
    except SystemExit as err:  # result_row exits with the case's output when it fails
        ctx.log(f"=== engine run failed\n{err}")
        raise RuntimeError(str(err)[-3000:]) from None
    cfg = load_train_config(
        [REPO / "configs" / f"{s.engine_recipe}.yaml"], ["data.url=synthetic", "data.tokens=synthetic"]
    )
    plan = plan_step(cfg, world_size=1, gpu_decode=False)
    row["plan_total_bytes"] = plan.total
    row["plan_parts"] = dict(plan.parts)
    cuda = ctx.device.type == "cuda"
    row["peak_over_plan"] = round(row["peak_memory_bytes"] / max(plan.total, 1), 4) if cuda else None
    row["compared"] = (
        "peak_memory_bytes: torch.cuda.max_memory_allocated() over a warm-up step and the timed steps of "
        "one rank of the DeepSpeed engine (weights, ZeRO partitions and gathered copies, gradients, master "
        "weights and AdamW moments, activations, the synthetic batch: bf16 clips on the device, codes "
        "and priorities), against plan_step(cfg, world_size=1, gpu_decode=False).total: every part of "
        "the plan, its batch part without the float32 DALI output (train_step.py's clips are made on the "
        "host, never decoded on the GPU)"
        if ctx.device.type == "cuda"
        else "on a CPU peak_memory_bytes is the process's peak RSS: not comparable with the plan's GPU bytes"
    )
    return row


def section_step(rec: dict[str, Any], clock: Clock, ctx: Context) -> None:
    s, dev, dtype = ctx.settings, ctx.device, ctx.dtype
    register_cpu_sdpa_flops()
    peak, peak_note = peak_bf16(dev) if s.bf16 else (None, "fp32 run: MFU not computed")
    env = ctx.result["sections"].get("env", {})
    measured = env.get("matmul", {}).get("tflops_per_s")
    rec.update(
        preset=s.preset,
        frames=s.frames,
        img_size=224,  # bench/fig1_memory.build's clip side
        dtype=str(dtype).removeprefix("torch."),
        weights=f"model.to({dtype}) and clips in {dtype}, no autocast (as DeepSpeed's bf16 runs)"
        if s.bf16
        else "float32",
        step="zero_grad + forward + mae_loss (pixel targets, norm_pix) + backward; no optimizer step",
        peak_flops_per_s=peak,
        peak_flops_note=peak_note,
        matmul_tflops_per_s=measured,
        runs=[],
    )
    # The engine run needs about a minute on the GPU (less on the quick CPU run): keep that much for it.
    reserve = 60.0 if not ctx.quick else 25.0
    for decoder in s.decoders:
        if clock.left() < reserve:
            rec["runs"].append({"decoder": decoder, "skipped": "over the section's budget"})
            continue
        cfg, model, _, _ = build(s.preset, s.frames, decoder, dev)  # batch-1 clip and plan: made per batch
        model = model.to(dtype)
        state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        for batch in s.batches:
            if clock.left() < reserve:
                rec["runs"].append(
                    {"decoder": decoder, "batch": batch, "skipped": "over the section's budget"}
                )
                continue
            say(f"step: decoder {decoder}, batch {batch}")
            try:
                row = bare_step(cfg, model, batch, ctx, state)
                if peak:
                    row["mfu"] = round(row["flops_total"] / row["step_s"] / peak, 4)
                if measured:
                    row["matmul_mfu"] = round(row["flops_total"] / row["step_s"] / (measured * 1e12), 4)
                row["params"] = sum(p.numel() for p in model.parameters())
            except SectionTimeout:
                raise
            except Exception as err:
                row = {"decoder": decoder, "batch": batch, "error": error_text(err)}
                ctx.log(f"=== step decoder {decoder} batch {batch}\n{traceback.format_exc()}")
            rec["runs"].append(row)
            ctx.save()
            release_memory()
        del model
        release_memory()
    try:
        rec["engine"] = engine_run(rec, clock, ctx)
    except SectionTimeout:
        raise
    except Exception as err:
        rec["engine"] = {"recipe": s.engine_recipe, "error": error_text(err)}


# ----------------------------------------------------------------------------------------------- train


def tokenizer_config(recipe: str) -> Any:
    from train.config import load_tokenizer_train_config

    return load_tokenizer_train_config([REPO / "configs" / f"{recipe}.yaml"], ["data.url=unused"]).tokenizer


def read_train_log(run: Path, skip: int, batch: int) -> dict[str, Any]:
    """Rates and the data-wait share from RUN/train_log.jsonl, the first `skip` steps left out."""
    from train.trainer import read_log

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
    lvmae = [sys.executable, "-m", "lvmae.cli"]
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
    from train.plan import plan_step

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


# ------------------------------------------------------------------------------------------- tokenizer


def section_tokenizer(rec: dict[str, Any], clock: Clock, ctx: Context) -> None:
    """Tokenizer.encode as `lvmae ingest tokens` runs it (ingest.tokens.encode_clips), on
    random uint8 clips already decoded: host -> device, encode, codes and priorities back to the host;
    at each batch size of the settings (a failure at one is recorded, the others still run)."""
    from ingest.tokens import encode_clips
    from lvmae.tokenizer import Tokenizer

    s, dev = ctx.settings, ctx.device
    cfg = tokenizer_config(s.tokenizer_recipe)
    torch.manual_seed(0)
    model = Tokenizer(cfg).to(dev).eval().requires_grad_(False)
    v = cfg.video
    cuda = dev.type == "cuda"
    rec.update(
        recipe=s.tokenizer_recipe,
        frames=v.num_frames,
        size=v.img_size,
        grid=list(v.grid),
        params=sum(p.numel() for p in model.parameters()),
        dtype="bf16 autocast (FSQ and the scorer in float32)" if cuda else "float32",
        timed="host -> device copy of uint8 clips, to_model_input, encode, codes and priorities to the host",
        runs=[],
    )

    def run(b: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(b)
        shape = (b, v.num_frames, v.img_size, v.img_size, 3)
        clips = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)

        def encode() -> None:
            encode_clips(model, clips, str(dev))  # the host copies of codes and priorities: the sync point

        row: dict[str, Any] = {"batch": b}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        encode()
        row["first_batch_s"] = round(time.perf_counter() - start, 3)
        times: list[float] = []
        for _ in range(s.tokenizer_timed):
            if times and clock.left() < 2 * max(times):
                row["note"] = f"stopped after {len(times)} timed batches: the section's budget"
                break
            start = time.perf_counter()
            encode()
            times.append(time.perf_counter() - start)
        row["batch_s"] = [round(t, 4) for t in times]
        row["clips_per_s"] = round(b * len(times) / sum(times), 3) if times else None
        if cuda:
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        return row

    for b in s.tokenizer_batches:
        if rec["runs"] and clock.left() < 10:
            rec["runs"].append({"batch": b, "skipped": "over the section's budget"})
            continue
        say(f"tokenizer: batch {b}")
        try:
            row = run(b)
        except SectionTimeout:
            raise
        except Exception as err:
            row = {"batch": b, "error": error_text(err)}
            ctx.log(f"=== tokenizer batch {b}\n{traceback.format_exc()}")
        rec["runs"].append(row)
        release_memory()
        ctx.save()
    rates = [r["clips_per_s"] for r in rec["runs"] if r.get("clips_per_s")]
    rec["clips_per_s"] = max(rates) if rates else None
    if not rates:
        raise RuntimeError(f"the tokenizer ran at no batch size: {rec['runs']}")
    train = ctx.result["sections"].get("train", {})
    stage = train.get("ingest_tokens", {})
    rec["ingest_tokens_clips_per_s"] = stage.get("clips_per_s")
    rec["ingest_tokens_note"] = (
        f"the whole `lvmae ingest tokens` stage of the train section (batch {stage.get('batch')}, PyAV "
        f"decode included) on the {train.get('tokenizer', {}).get('recipe', '?')} tokenizer"
        if stage.get("clips_per_s")
        else "the train section's ingest tokens stage did not run"
    )


# -------------------------------------------------------------------------------------------------- run

RUNNERS: dict[str, Callable[[dict[str, Any], Clock, Context], None]] = {
    "env": section_env,
    "step": section_step,
    "train": section_train,
    "tokenizer": section_tokenizer,
}


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
