"""bench/gpu_check.py's `step` section: the bare model's step beside the memory plan, then the engine."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import traceback
from typing import Any

import torch
from fig1_memory import build, count_flops, measure_step, register_cpu_sdpa_flops, result_row, train_step
from gpu_check_common import (
    BENCH,
    REPO,
    Clock,
    Context,
    SectionTimeout,
    error_text,
    release_memory,
    say,
    sync,
)

# Dense bf16 peak of the chips this project may be lent (NVIDIA's data sheets, without sparsity).
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


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
    from train.activations import activation_bytes
    from train.memory import plan_step

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
    from train.memory import plan_step

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
