"""Training step time and peak memory of a recipe, through the real DeepSpeed engine.

Each recipe runs in a fresh process (one rank, the recipe's ZeRO stage, precision and activation
checkpointing): its model is built under zero.Init, wrapped by the engine with AdamW, and trained for a
warm-up step plus --steps timed steps on synthetic batches of the recipe's shape (random clips, codes
and priorities), so the figure is the step alone, not the data path (bench/loader_throughput.py has that).

    .venv/bin/python bench/train_step.py                                   # demo_cpu and vitb_128f
    .venv/bin/python bench/train_step.py --recipes vitb_128f --batch-size 1 --precision fp32
    .venv/bin/python bench/train_step.py --recipes demo_cpu "vitb_128f:data.batch_size=1,run.precision=fp32"

Memory: on CUDA, torch.cuda.max_memory_allocated over the steps (tensors only); on a CPU, the process's
peak resident set over the steps (VmHWM after a reset, see fig1_memory.py) and its increase over the
resident set right before the first step, which includes the AdamW state allocated on that step.
Writes bench/results/train_step_<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

from fig1_memory import proc_status_bytes, read_peak, reset_peak, result_row, save_runs  # noqa: E402

GIB = 2**30


def run_one(recipe: str, steps: int, overrides: list[str]) -> dict:
    """One recipe, in this process (a rank of its own)."""
    import torch

    from train.config import load_train_config
    from train.dist import join_process_group
    from train.engine import build_engine, model_init_context, resolve_precision
    from train.tasks import MAETask
    from train.trainer import step_seed

    cfg = load_train_config(
        [REPO / "configs" / f"{recipe}.yaml"],
        # It times steps: the rate does not matter, and at a batch of 1 a recipe's rate scaled with the
        # global batch (optim.lr_reference_batch) falls below its min_lr.
        ["data.url=synthetic", "data.tokens=synthetic", "optim.min_lr=0", *overrides],
    )
    join_process_group()
    task = MAETask(cfg)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    precision = resolve_precision(cfg.run.precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    with model_init_context(cfg):
        model = task.build_model()
    engine, _, _ = build_engine(model, cfg, world_size=1)
    v, b = task.model_cfg.video, cfg.data.batch_size
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(b, v.in_chans, v.num_frames, v.img_size, v.img_size, generator=gen)
    batch = {
        "codes": torch.randint(0, task.model_cfg.target.codebook_size, (b, *v.grid), generator=gen),
        "priority": torch.rand(b, *v.grid, generator=gen),
    }
    video = video.to(device, dtype)

    def step(i: int) -> float:
        start = time.perf_counter()
        loss = task.loss(engine, batch, video, torch.Generator().manual_seed(step_seed(0, i, 0)), i)
        engine.backward(loss)
        engine.step()
        loss.item()  # sync point: the step is done
        return time.perf_counter() - start

    before, method = reset_peak(device)
    times = [step(i) for i in range(steps + 1)]
    peak = read_peak(device, method)
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    return {
        "recipe": recipe,
        "overrides": overrides,
        "preset": cfg.model.preset,
        "params": n_params,
        "frames": v.num_frames,
        "size": v.img_size,
        "tokens": v.num_tokens,
        "decoder": f"{task.model_cfg.masking.decoder} {task.model_cfg.masking.decoder_budget}",
        "target": f"{task.model_cfg.target.kind} ({task.model_cfg.target.token_loss})",
        "batch": b,
        "precision": precision,
        "zero_stage": cfg.run.zero_stage,
        "activation_checkpointing": cfg.run.activation_checkpointing,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "first_step_s": round(times[0], 3),
        "step_s": [round(t, 3) for t in times[1:]],
        "median_step_s": round(statistics.median(times[1:]), 3),
        "clips_per_s": round(b / statistics.median(times[1:]), 2),
        "memory_before_bytes": before,
        "peak_memory_bytes": peak,
        "peak_increase_bytes": peak - before,
        "memory_method": method,
        "rss_after_bytes": proc_status_bytes("VmRSS") if device.type == "cpu" else None,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | preset | frames x px | batch | precision | act. ckpt | step (s, median) | clips/s | "
        "peak memory (GiB) | increase over the steps (GiB) |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['preset']} | {r['frames']} x {r['size']} | {r['batch']} | {r['precision']} | "
            f"{'yes' if r['activation_checkpointing'] else 'no'} | {r['median_step_s']} | {r['clips_per_s']} | "
            f"{r['peak_memory_bytes'] / GIB:.2f} | {r['peak_increase_bytes'] / GIB:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--recipes",
        nargs="+",
        default=["demo_cpu", "vitb_128f"],
        help="recipe names in configs/, each optionally with its own overrides: NAME:key=value,key=value",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--batch-size", type=int, help="per-rank batch (default: the recipe's)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="default: the recipe's")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one recipe in this process
    p.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.override)), flush=True)
        return
    overrides = [f"data.batch_size={args.batch_size}"] if args.batch_size else []
    overrides += [f"run.precision={args.precision}"] if args.precision else []
    rows = []
    for spec in args.recipes:
        recipe, _, own = spec.partition(":")
        cmd = [sys.executable, __file__, "--one", recipe, "--steps", str(args.steps)]
        cmd += [f"--override={o}" for o in [*overrides, *filter(None, own.split(","))]]
        row = result_row(cmd, recipe)
        rows.append(row)
        print(
            f"{recipe}: median step {row['median_step_s']} s, peak {row['peak_memory_bytes'] / GIB:.2f} GiB",
            flush=True,
        )
    out = save_runs(args.out, "train_step", rows)
    print(table(rows))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
