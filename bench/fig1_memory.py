"""Paper Figure 1 on this machine: memory and FLOPs of one training step vs clip length and decoder masking.

One step = forward + pixel loss (norm_pix) + backward; no optimizer step. Each (frames, decoder) point
runs in a fresh subprocess so that memory peaks never mix. Decoder budgets use `adaptive` masking with
random priorities (the same cost as `random`). docs/benchmarks.md says what each number includes.

    .venv/bin/python bench/fig1_memory.py --frames 16 32 64 128 --decoder all 0.5 0.15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from lvmae.losses import mae_loss
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.presets import preset_config

GIB = 2**30
aten = torch.ops.aten


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)  # the matmuls QK^T and PV, as for the CUDA kernels


def _cpu_sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


def register_cpu_sdpa_flops() -> None:
    """FlopCounterMode (torch 2.13) has no formula for the CPU flash-attention ops and counts 0 for them."""
    for op, formula in (
        (aten._scaled_dot_product_flash_attention_for_cpu, _cpu_sdpa_flops),
        (aten._scaled_dot_product_flash_attention_for_cpu_backward, _cpu_sdpa_backward_flops),
    ):
        if op not in flop_counter.flop_registry:  # a later torch may count them itself
            flop_counter.register_flop_formula(op)(formula)


def build(preset: str, frames: int, decoder: str, device: torch.device):
    """-> (cfg, model, video, plan): a resolved config, its model, one random clip and one mask plan."""
    cfg = preset_config(preset, num_frames=frames, img_size=224)
    if decoder == "all":
        cfg.masking.decoder = "all"
    else:
        cfg.masking.decoder, cfg.masking.decoder_budget = "adaptive", float(decoder)
    gen = torch.Generator().manual_seed(0)
    model = MaskedVideoAutoencoder(cfg).to(device).train()
    video = torch.randn((1, 3, frames, 224, 224), generator=gen).to(device)  # (B, C, T, H, W)
    priority = torch.rand((1, *cfg.video.grid), generator=gen)  # (B, T', H', W')
    return cfg, model, video, model.plan(1, gen, priority, device)


def forward_loss(cfg, model, video, plan, amp: bool) -> torch.Tensor:
    with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=amp):
        return mae_loss(cfg, model(video, plan=plan), video=video)


def train_step(cfg, model, video, plan, amp: bool) -> None:
    """Forward, loss and backward; gradients are freed first so every step allocates them afresh."""
    model.zero_grad(set_to_none=True)
    forward_loss(cfg, model, video, plan, amp).backward()


def count_flops(cfg, model, video, plan, amp: bool) -> dict:
    """FLOPs of one step (matmul, conv and SDPA ops only), forward alone and forward + backward."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        loss = forward_loss(cfg, model, video, plan, amp)
        forward = counter.get_total_flops()
        loss.backward()
    ops = counter.get_flop_counts()["Global"]
    return {
        "flops_forward": forward,
        "flops_total": counter.get_total_flops(),
        "sdpa_ops": sorted(str(op) for op in ops if "scaled_dot_product" in str(op)),
    }


def proc_status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(device: torch.device) -> tuple[int, str]:
    """Start a peak-memory window: -> (bytes in use now, how the peak will be read)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
    try:  # Linux: writing "5" to clear_refs resets VmHWM (peak RSS) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (not resettable: includes model build)"
    return proc_status_bytes("VmRSS"), method


def read_peak(device: torch.device, method: str) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    if method.startswith("VmHWM"):
        return proc_status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def saved_tensor_bytes(fn, exclude: set[int]) -> int:
    """Run fn; -> bytes of the storages autograd saved for backward, each once, skipping `exclude` ptrs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure_step(step, device: torch.device, exclude: set[int]) -> dict:
    """Wall time, peak memory over the memory right before, and saved-for-backward bytes of one step."""
    before, method = reset_peak(device)
    start = time.perf_counter()
    saved = saved_tensor_bytes(step, exclude)
    if device.type == "cuda":
        torch.cuda.synchronize()  # CPU-GPU sync point: the step must finish before the clock stops
    seconds = time.perf_counter() - start
    peak = read_peak(device, method)
    return {
        "method": method,
        "before_bytes": before,
        "peak_bytes": peak,
        "peak_increase_bytes": peak - before,
        "saved_activation_bytes": saved,
        "seconds": seconds,
    }


def run_one(preset: str, frames: int, decoder: str, device: torch.device, amp: bool) -> dict:
    """One grid point, in this (fresh) process: a cold step for memory, a warm step, a counted step."""
    cfg, model, video, plan = build(preset, frames, decoder, device)
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    step = lambda: train_step(cfg, model, video, plan, amp)  # noqa: E731
    load, first = os.getloadavg()[0], measure_step(step, device, state)
    warm = measure_step(step, device, state)  # its RSS baseline holds what glibc kept from the first step
    return {
        "frames": frames,
        "decoder": decoder,
        "strategy": cfg.masking.decoder,
        "tokens": cfg.video.num_tokens,
        "visible": plan.num_visible,
        "decoded": plan.num_selected,
        "decoder_seq": plan.num_visible + plan.num_selected,
        "params": sum(p.numel() for p in model.parameters()),
        "loadavg_1min_at_start": load,
        "first_step": first,
        "warm_step": warm,
        "step_s_best": min(first["seconds"], warm["seconds"]),  # the less disturbed of the two
        **count_flops(cfg, model, video, plan, amp),
    }


def run_grid(args: argparse.Namespace) -> list[dict]:
    """Each grid point in its own subprocess (so memory peaks never mix); -> their result dicts."""
    results = []
    for frames in args.frames:
        for decoder in args.decoder:
            cmd = [sys.executable, __file__, "--child", str(frames), decoder, "--preset", args.preset]
            cmd += ["--device", args.device] + (["--bf16"] if args.bf16 else [])
            print(f"frames={frames} decoder={decoder} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"grid point frames={frames} decoder={decoder} failed:\n{proc.stderr}")
            results.append(json.loads(proc.stdout.splitlines()[-1]))
    return results


def result_row(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """Run one benchmark case in a fresh process (`cmd` prints `RESULT {json}` last) -> that JSON, with the
    load average before and after (other work on the machine skews timings); exits if the case failed."""
    load_before = os.getloadavg()[0]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        sys.exit(f"{label} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    row = json.loads(lines[-1][len("RESULT ") :])
    row["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return row


def save_runs(out_dir: str | Path, name: str, rows: list[dict], **extra: object) -> Path:
    """OUT_DIR/NAME_<device>.json: {"machine", "date", **extra, "runs": rows} for the device torch would
    use here; -> its path."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "machine": machine_info(device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **extra,
        "runs": rows,
    }
    out = Path(out_dir) / f"{name}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


def machine_info(device: torch.device) -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu or platform.processor()
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "device": device.type,
        "device_name": name,
    }


def markdown_table(results: list[dict]) -> str:
    rows = [
        "| frames | decoder | tokens | decoded | decoder seq | GFLOPs fwd+bwd | GFLOPs fwd "
        "| peak increase (GiB) | saved activations (GiB) | step (s, best of 2) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["first_step"]
        rows.append(
            f"| {r['frames']} | {r['decoder']} | {r['tokens']} | {r['decoded']} | {r['decoder_seq']} "
            f"| {r['flops_total'] / 1e9:,.0f} | {r['flops_forward'] / 1e9:,.0f} "
            f"| {m['peak_increase_bytes'] / GIB:.2f} | {m['saved_activation_bytes'] / GIB:.2f} "
            f"| {r['step_s_best']:.1f} |"
        )
    return "\n".join(rows)


def plot(results: list[dict], path: Path, title: str) -> None:
    """Two panels: peak memory (solid) and saved activations (dashed) vs frames; GFLOPs vs frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (ax_mem, ax_flop) = plt.subplots(1, 2, figsize=(11, 4.2))
    for decoder in dict.fromkeys(r["decoder"] for r in results):
        rs = [r for r in results if r["decoder"] == decoder]
        frames = [r["frames"] for r in rs]
        label = "decoder: all masked" if decoder == "all" else f"decoder budget {decoder}"
        gib = {
            k: [r["first_step"][k] / GIB for r in rs]
            for k in ("peak_increase_bytes", "saved_activation_bytes")
        }
        (line,) = ax_mem.plot(frames, gib["peak_increase_bytes"], "o-", label=label)
        ax_mem.plot(frames, gib["saved_activation_bytes"], "s--", color=line.get_color())
        ax_flop.plot(frames, [r["flops_total"] / 1e9 for r in rs], "o-", label=label)
    ax_mem.set(ylabel="GiB", title="Memory: peak increase (solid), saved activations (dashed)")
    ax_flop.set(ylabel="GFLOPs", title="Compute: forward + backward")
    frames = sorted({r["frames"] for r in results})
    for ax in (ax_mem, ax_flop):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(frames, labels=frames)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("frames (224 px, tubelet 2x16x16, batch 1)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def decoder_setting(text: str) -> str:
    """'all' or a decoder budget in (0, 1], as given on the command line."""
    if text == "all" or (text.replace(".", "", 1).isdigit() and 0.0 < float(text) <= 1.0):
        return text
    raise argparse.ArgumentTypeError(f"expected 'all' or a budget in (0, 1], got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--decoder", nargs="+", type=decoder_setting, default=["all", "0.5", "0.15"])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--preset", default="base")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (meant for cuda)")
    p.add_argument("--child", nargs=2, metavar=("FRAMES", "DECODER"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here")
    device = torch.device(args.device)
    register_cpu_sdpa_flops()
    if args.child:
        print(json.dumps(run_one(args.preset, int(args.child[0]), args.child[1], device, args.bf16)))
        return
    start, load_before = time.perf_counter(), os.getloadavg()
    results = run_grid(args)
    name = f"fig1_{device.type}{'_bf16' if args.bf16 else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(device), "preset": args.preset, "dtype": "bf16 autocast" if args.bf16 else "fp32"}
    info.update(grid_wall_s=round(time.perf_counter() - start, 1), loadavg_before=load_before)
    info["loadavg_after"] = os.getloadavg()  # 1/5/15-min load: other work sharing the CPUs skews timings
    (args.out / f"{name}.json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    title = f"ViT-{args.preset} MAE step, {info['dtype']}, {info['device_name']} ({info['cpu_count']} CPUs)"
    plot(results, args.out / f"{name}.png", title)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
