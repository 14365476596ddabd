"""The LVMAE paper's ablations at tiny scale on CPU: pretrain, then probe, on the procedural benchmark.

    python bench/ablations.py            # 3 seeds, every row (42 minutes on 2 cores)
    python bench/ablations.py --quick    # 1 seed, short runs: 6 minutes, to see that it works

What it does, all through the product's own commands and data path:

1. `lvmae ingest synth` writes the `order` task (which of a red and a blue flash, one in the first and one
   in the last quarter of a 128-frame clip, comes first: 32 frames cannot tell) and the `color` control
   (any frame tells); `lvmae ingest clips` cuts them into 128-frame 32 px clips, split by source video.
   The order videos are also cut into 32-frame clips (4 per video, the same train videos).
2. One tokenizer (configs/tokenizer_demo_128f_cpu.yaml) is trained on the order train split, and its
   codes and priorities are precomputed for the 128-frame clips and, with the same weights on 32-frame
   clips, for the 32-frame ones.
3. Every row pretrains the tiny LVMAE (configs/demo_128f_cpu.yaml) on the order train split with the
   same steps, learning rate and clips, seeds 0..S-1:
   decoder `all` / `random` / `running_cell` / `adaptive` at a budget of 0.15 with token targets,
   `adaptive` with pixel targets, and `adaptive` on 32-frame clips with 4x the batch (the same tokens
   per step, the same videos).
4. Each pretrained encoder is probed (lvmae eval probe: attentive probe, frozen encoder) on 128-frame
   clips of the order test split and of the color control; so is a random-init encoder per seed.

Results: bench/results/ablations[_quick].json (every run's figures) and .png; the table is printed as
Markdown (docs/evaluation.md holds the last full one). Pretraining wall time and peak memory (the
process's peak RSS on CPU) come from each run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
MAE_RECIPE = REPO / "configs" / "demo_128f_cpu.yaml"
TOKENIZER_RECIPE = REPO / "configs" / "tokenizer_demo_128f_cpu.yaml"

# name: (overrides of the pretraining recipe, clip frames)
ROWS: dict[str, tuple[list[str], int]] = {
    "all (VideoMAE), tokens": (["model.masking.decoder=all"], 128),
    "random 0.15, tokens": (["model.masking.decoder=random"], 128),
    "running_cell 0.15, tokens": (["model.masking.decoder=running_cell"], 128),
    "adaptive 0.15, tokens (LVMAE)": ([], 128),
    "adaptive 0.15, pixels": (["model.target.kind=pixels"], 128),
    "adaptive 0.15, tokens, 32 frames": ([], 32),
}
RANDOM_INIT = "random-init encoder (no pretraining)"
LVMAE = "adaptive 0.15, tokens (LVMAE)"


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"{tail}\nfailed ({proc.returncode}): {' '.join(cmd)}; log {log}")


def lvmae(*args: str, log: Path) -> None:
    run([sys.executable, "-m", "lvmae_cli", *args], log)


def prepare_data(root: Path, args: argparse.Namespace) -> dict[str, str]:
    """Videos -> clip data sets: order at 128 and 32 frames, color at 128 frames."""
    log = root / "logs" / "data.log"
    data = {}
    for task, num in (("order", args.videos), ("color", args.control_videos)):
        lvmae("ingest", "synth", str(root / task), "--task", task, "--num", str(num), "--quiet", log=log)
        cuts = [(128, 128)] + ([(32, 32)] if task == "order" else [])
        for frames, stride in cuts:
            out = root / f"{task}{frames}"
            lvmae(
                "ingest", "clips", str(root / task / "manifest.csv"), "--out", str(out), "--frames",
                str(frames), "--size", "32", "--clip-stride", str(stride), "--shard-clips", "32",
                "--val-share", "0.1", "--test-share", "0.25", "--workers", "2", "--quiet", log=log,
            )  # fmt: skip
            data[f"{task}{frames}"] = str(out)
    return data


def prepare_tokens(root: Path, data: dict[str, str], steps: int) -> dict[int, str]:
    """Train the tokenizer on the order train split; its tokens for the 128- and 32-frame clips."""
    from lvmae.tokenizer import load_tokenizer, save_tokenizer

    log = root / "logs" / "tokenizer.log"
    run_dir = root / "tokenizer"
    if not (run_dir / "tokenizer" / "config.json").is_file():
        lvmae(
            "train", "tokenizer", str(TOKENIZER_RECIPE), f"data.url={data['order128']}", f"run.out={run_dir}",
            f"run.steps={steps}", f"optim.total_steps={steps}", "run.metrics_port_base=0", "--resume", "auto",
            log=log,
        )  # fmt: skip
    # The same weights on 32-frame clips: the tokenizer is convolutional (replicate padding in time).
    tok = load_tokenizer(run_dir / "tokenizer")
    tok.cfg.video.num_frames = 32
    short = type(tok)(tok.cfg)
    short.load_state_dict(tok.state_dict())
    save_tokenizer(short.eval(), run_dir / "tokenizer32")
    ids = {}
    for frames, directory in ((128, "tokenizer"), (32, "tokenizer32")):
        lvmae("ingest", "tokens", data[f"order{frames}"], "--tokenizer", str(run_dir / directory), "--device",
              "cpu", "--quiet", log=log)  # fmt: skip
        ids[frames] = json.loads((run_dir / directory / "config.json").read_text())["tokenizer_id"]
    return ids


def pretrain(
    root: Path, row: str, seed: int, data: dict[str, str], tokens: dict[int, str], steps: int
) -> Path:
    overrides, frames = ROWS[row]
    out = root / "runs" / f"{slug(row)}-s{seed}"
    if (out / "summary.json").is_file():
        return out
    batch = 4 * 128 // frames  # the same tokens per step at every clip length
    args = [
        "train", "mae", str(MAE_RECIPE), *overrides, f"model.video.num_frames={frames}",
        f"data.url={data[f'order{frames}']}", f"data.tokens={tokens[frames]}", f"data.batch_size={batch}",
        f"run.out={out}", f"run.seed={seed}", f"run.steps={steps}", f"optim.total_steps={steps}",
        "run.checkpoint_every=0", "run.metrics_port_base=0", "--resume", "auto",
    ]  # fmt: skip
    lvmae(*args, log=root / "logs" / f"{slug(row)}-s{seed}.log")
    return out


def probe(
    root: Path,
    source: Path,
    task: str,
    data: dict[str, str],
    seed: int,
    random_init: bool,
    epochs: int,
    frames: int = 128,
) -> dict:
    """Probe on 128-frame test clips: with frames=32, four 32-frame windows per clip, logits averaged."""
    name = "random" if random_init else source.parent.name  # source: RUN/export
    out = root / "probes" / f"{name}-s{seed}-{task}-{frames}f"
    if not (out / "probe.json").is_file():
        extra = ["--random-init"] if random_init else []
        lvmae(
            "eval", "probe", str(source), data[f"{task}128"], "--out", str(out), "--frames", str(frames),
            "--views", f"{128 // frames}x1", "--seed", str(seed), "--epochs", str(epochs), *extra,
            log=root / "logs" / f"probe-{out.name}.log",
        )  # fmt: skip
    return json.loads((out / "probe.json").read_text())


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, short runs, fewer videos (< 10 minutes)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3; quick: 1)")
    p.add_argument(
        "--steps", type=int, default=None, help="pretraining steps per run (default 600; quick 100)"
    )
    p.add_argument("--tokenizer-steps", type=int, default=None, help="default 400; quick 60")
    p.add_argument("--videos", type=int, default=None, help="order videos (default 400; quick 80)")
    p.add_argument("--control-videos", type=int, default=None, help="color videos (default 200; quick 40)")
    p.add_argument("--probe-epochs", type=int, default=None, help="default 40; quick 100")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--rows", nargs="*", default=None, help="row names (default: all)")
    p.add_argument("--work", default=None, help="working folder (default bench/work/ablations[_quick])")
    p.add_argument("--fresh", action="store_true", help="delete the working folder first")
    args = p.parse_args(argv)
    q = args.quick
    args.seeds = args.seeds or (1 if q else 3)
    args.steps = args.steps or (100 if q else 600)
    args.tokenizer_steps = args.tokenizer_steps or (60 if q else 400)
    args.videos = args.videos or (80 if q else 400)
    args.control_videos = args.control_videos or (40 if q else 200)
    # about 500-700 probe steps either way: the probe's training is most of a probe's cost
    args.probe_epochs = args.probe_epochs or (100 if q else 40)
    name = "ablations_quick" if q else "ablations"
    root = Path(args.work or REPO / "bench" / "work" / name).absolute()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    rows = args.rows or list(ROWS)
    started = time.perf_counter()

    print(f"data: {args.videos} order + {args.control_videos} color videos -> clips", flush=True)
    data = prepare_data(root, args)
    print(f"tokenizer: {args.tokenizer_steps} steps, then its tokens", flush=True)
    t0 = time.perf_counter()
    tokens = prepare_tokens(root, data, args.tokenizer_steps)
    tokenizer_seconds = round(time.perf_counter() - t0, 1)

    jobs = [(row, seed) for row in rows for seed in range(args.seeds)]
    print(f"pretraining: {len(jobs)} runs of {args.steps} steps, {args.jobs} at a time", flush=True)

    def one(job: tuple[str, int]) -> dict[str, Any]:
        row, seed = job
        out = pretrain(root, row, seed, data, tokens, args.steps)
        summary = json.loads((out / "summary.json").read_text())
        figures = {
            "row": row,
            "seed": seed,
            "pretrain_seconds": summary["seconds"],
            "peak_memory_bytes": summary["peak_memory"]["bytes"],
            "peak_memory_kind": summary["peak_memory"]["kind"],
        }
        for task in ("order", "color"):
            r = probe(root, out / "export", task, data, seed, False, args.probe_epochs)
            figures[f"{task}_top1"] = r["test"]["top1"]
            figures[f"{task}_test_clips"] = r["test"]["num_clips"]
        if row == LVMAE:  # the 128-frame LVMAE encoder on 4 windows of 32 frames: can it still tell?
            r = probe(root, out / "export", "order", data, seed, False, args.probe_epochs, frames=32)
            figures["order_32f_views_top1"] = r["test"]["top1"]
        print(
            f"  {row} seed {seed}: order {100 * figures['order_top1']:.1f}%, color "
            f"{100 * figures['color_top1']:.1f}% ({summary['seconds']:.0f} s pretraining)",
            flush=True,
        )
        return figures

    def baseline(seed: int) -> dict[str, Any]:
        figures: dict[str, Any] = {"row": RANDOM_INIT, "seed": seed}
        source = root / "runs" / f"{slug(rows[0])}-s0" / "export"
        for task in ("order", "color"):
            r = probe(root, source, task, data, seed, True, args.probe_epochs)
            figures[f"{task}_top1"] = r["test"]["top1"]
            figures[f"{task}_test_clips"] = r["test"]["num_clips"]
        r = probe(root, source, "order", data, seed, True, args.probe_epochs, frames=32)
        figures["order_32f_views_top1"] = r["test"]["top1"]
        return figures

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one, jobs))
        runs += list(pool.map(baseline, range(args.seeds)))

    table = []
    for row in [*rows, RANDOM_INIT]:
        mine = [r for r in runs if r["row"] == row]
        entry: dict[str, Any] = {"row": row}
        for key in (
            "order_top1",
            "order_32f_views_top1",
            "color_top1",
            "pretrain_seconds",
            "peak_memory_bytes",
        ):
            if all(key in r for r in mine):
                entry[key] = summarize([r[key] for r in mine])
        table.append(entry)
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "fresh")},
        "chance": {"order": 0.5, "color": 0.25},
        "test_clips": {"order": runs[0]["order_test_clips"], "color": runs[0]["color_test_clips"]},
        "tokenizer_seconds": tokenizer_seconds,
        "seconds": round(time.perf_counter() - started, 1),
        "table": table,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    plot(result, RESULTS / f"{name}.png")
    print(f"\n{RESULTS / (name + '.json')}, {RESULTS / (name + '.png')}; {result['seconds']:.0f} s in all")
    return 0


def markdown(result: dict[str, Any]) -> str:
    def pct(s: dict[str, float] | None) -> str:
        if not s:
            return "-"
        spread = f" ({100 * s['min']:.1f}-{100 * s['max']:.1f})" if s["n"] > 1 else ""
        return f"{100 * s['mean']:.1f}{spread}"

    lines = [
        "| pretraining (decoder masking, targets, clip) | order top-1 % | order, 4 x 32-frame views % "
        "| color top-1 % | pretraining s | peak RSS GiB |",
        "|---|---|---|---|---|---|",
    ]
    for e in result["table"]:
        sec = f"{e['pretrain_seconds']['mean']:.0f}" if "pretrain_seconds" in e else "-"
        mem = f"{e['peak_memory_bytes']['mean'] / 2**30:.2f}" if "peak_memory_bytes" in e else "-"
        lines.append(
            f"| {e['row']} | {pct(e.get('order_top1'))} | {pct(e.get('order_32f_views_top1'))} | "
            f"{pct(e.get('color_top1'))} | {sec} | {mem} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["table"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(table) + 1.5), sharey=True)
    for ax, task in zip(axes, ("order", "color")):
        key = f"{task}_top1"
        means = [100 * e[key]["mean"] for e in table]
        lo = [100 * (e[key]["mean"] - e[key]["min"]) for e in table]
        hi = [100 * (e[key]["max"] - e[key]["mean"]) for e in table]
        ax.barh(range(len(table)), means, xerr=[lo, hi], color="tab:blue", alpha=0.7)
        ax.axvline(100 * result["chance"][task], color="k", ls="--", lw=1, label="chance")
        ax.set_title(f"{task}: test top-1 % ({result['test_clips'][task]} clips)", fontsize=10)
        ax.set_xlim(0, 100)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_yticks(range(len(table)), [e["row"] for e in table], fontsize=8)
    axes[0].invert_yaxis()
    seeds = result["settings"]["seeds"]
    fig.suptitle(
        f"attentive probe on frozen encoders, {result['settings']['steps']} pretraining steps, {seeds} seed(s): "
        "mean and range",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
