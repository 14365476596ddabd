"""The LVMAE paper's ablations at tiny scale on CPU: pretrain, then probe, on the procedural benchmark.

    python bench/ablations.py            # 5 seeds, every row: resumable, each run kept as it finishes
    python bench/ablations.py --quick    # 1 seed, short runs, few videos: to see that it works
    python bench/ablations.py --table    # the results file's table, written into docs/evaluation.md

What it does, all through the product's own commands and data path:

1. `lvmae ingest synth` writes --videos videos of each of --tasks: `order` (pretrained on: which of a red
   and a blue flash, one in the first and one in the last quarter of a 128-frame clip, comes first; no
   32-frame window sees both), `drift` (a second long-context task, never pretrained on: which way a
   square drifts under an oscillation that dominates any 32-frame window) and `color` (the control: any
   frame tells). `lvmae ingest clips` cuts them into 128-frame 32 px clips, split by source video: half
   test, a tenth val. The pretraining videos are also cut into 32-frame clips (4 per video, the same
   train videos).
2. One tokenizer (configs/tokenizer_demo_128f_cpu.yaml) is trained on the pretraining task's train split,
   and its codes and priorities are precomputed for the 128-frame clips and, with the same weights, for
   the 32-frame ones.
3. Every row (bench/ablation_design.py: decoder masking, priority, targets, clip length, and what a
   32-frame row holds equal: steps, FLOPs or peak memory) pretrains the tiny LVMAE
   (configs/demo_128f_cpu.yaml) on that train split, seeds 0..S-1. Rows whose schedules come out the same
   share their runs.
4. Each pretrained encoder is probed (lvmae eval probe: attentive probe, frozen encoder) on the 128-frame
   test clips of every long-context task; so is a random-init encoder per seed. The LVMAE row and the
   random-init encoder are also probed on the control, and on `order` through four 32-frame windows.

Results: bench/results/ablations[_quick].json (every run's figures, each row's mean and 95% interval, the
paired differences; written after every run, `complete` at the end) and .png (bench/ablation_report.py).
Pretraining wall time and peak memory (the process's peak RSS on CPU) come from each run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ablation_design, ablation_report, doc_table

import ablation_report as report
from ablation_design import COMPARISONS, LVMAE, MAE_RECIPE, RANDOM_INIT, ROWS, schedule, train_config
from doc_table import short_commit, write_between

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
TOKENIZER_RECIPE = REPO / "configs" / "tokenizer_demo_128f_cpu.yaml"
DOC = REPO / "docs" / "evaluation.md"
CHANCE = {"order": 0.5, "color": 0.25, "count": 0.25, "drift": 0.5}
CONTROLS = {"color"}  # any frame tells: it shows that the probe reads what an encoder holds, no more


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
    """Videos -> clip data sets: every task at 128 frames, the pretraining task also at 32 frames."""
    log = root / "logs" / "data.log"
    data = {}
    for task in args.tasks:
        lvmae(
            "ingest", "synth", str(root / task), "--task", task, "--num", str(args.videos), "--quiet", log=log
        )
        cuts = [(128, 128)] + ([(32, 32)] if task == args.tasks[0] else [])
        for frames, stride in cuts:
            out = root / f"{task}{frames}"
            lvmae(
                "ingest", "clips", str(root / task / "manifest.csv"), "--out", str(out), "--frames",
                str(frames), "--size", "32", "--clip-stride", str(stride), "--shard-clips", "32",
                "--val-share", "0.1", "--test-share", "0.5", "--workers", "2", "--quiet", log=log,
            )  # fmt: skip
            data[f"{task}{frames}"] = str(out)
    return data


def prepare_tokens(root: Path, data: dict[str, str], task: str, steps: int) -> dict[int, str]:
    """Train the tokenizer on the pretraining task's train split; its tokens for the 128- and 32-frame
    clips."""
    from lvmae.tokenizer import load_tokenizer, save_tokenizer

    log = root / "logs" / "tokenizer.log"
    run_dir = root / "tokenizer"
    if not (run_dir / "tokenizer" / "config.json").is_file():
        lvmae(
            "train", "tokenizer", str(TOKENIZER_RECIPE), f"data.url={data[f'{task}128']}", f"run.out={run_dir}",
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
        lvmae("ingest", "tokens", data[f"{task}{frames}"], "--tokenizer", str(run_dir / directory), "--device",
              "cpu", "--quiet", log=log)  # fmt: skip
        ids[frames] = json.loads((run_dir / directory / "config.json").read_text())["tokenizer_id"]
    return ids


def pretrain(root: Path, run_name: str, row: str, seed: int, data: dict, tokens: dict, plan: tuple) -> Path:
    """One row's pretraining at seed `seed` (skipped when its summary exists); plan: (batch, steps)."""
    spec, (batch, steps) = ROWS[row], plan
    out = root / "runs" / f"{run_name}-s{seed}"
    if (out / "summary.json").is_file():
        return out
    task = data["pretrain_task"]
    args = [
        "train", "mae", str(MAE_RECIPE), *spec.overrides, f"model.video.num_frames={spec.frames}",
        f"data.url={data[f'{task}{spec.frames}']}", f"data.tokens={tokens[spec.frames]}",
        f"data.batch_size={batch}", f"run.out={out}", f"run.seed={seed}", f"run.steps={steps}",
        f"optim.total_steps={steps}", "run.checkpoint_every=0", "run.metrics_port_base=0", "--resume", "auto",
    ]  # fmt: skip
    lvmae(*args, log=root / "logs" / f"{run_name}-s{seed}.log")
    return out


def probe(
    root: Path,
    source: Path,
    task: str,
    data: dict,
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


def random_export(root: Path) -> Path:
    """An export of the LVMAE row's architecture, never trained: what --random-init probes rebuild (every
    weight drawn again from the probe's seed)."""
    out = root / "random-init-export"
    if not (out / "config.yaml").is_file():
        from lvmae.mae import MaskedVideoAutoencoder
        from lvmae.weights import save_mae

        model = MaskedVideoAutoencoder(train_config(ROWS[LVMAE], 4).model_config())
        save_mae(model.state_dict(), model.cfg, out)
    return out


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def plans(rows: list[str], steps: int) -> tuple[dict[str, tuple], dict[str, str], dict[str, dict]]:
    """-> each row's (batch, steps), the run folder name each row uses (rows with the same overrides,
    clip length, batch and steps share the first one's runs), and what each matched row measured."""
    schedules, run_names, matched, seen = {}, {}, {}, {}
    for row in rows:
        batch, n, what = schedule(row, steps)
        if abs(n - steps) <= 0.01 * steps:  # a compute match within 1% of the LVMAE row's steps: its steps
            n = steps
        key = (ROWS[row].overrides, ROWS[row].frames, batch, n)
        schedules[row], matched[row] = (batch, n), what
        run_names[row] = seen.setdefault(key, slug(row))
    return schedules, run_names, matched


def summarize(args: argparse.Namespace, rows: list[str], runs: list[dict], extra: dict) -> dict[str, Any]:
    """The results: every run, each row's intervals, the paired differences."""
    table = []
    for row in [*rows, RANDOM_INIT]:
        mine = [r for r in runs if r["row"] == row]
        if not mine:
            continue
        entry: dict[str, Any] = {"row": row, **extra["rows"].get(row, {})}
        keys = [f"{t}_top1" for t in args.tasks] + [
            "order_32f_views_top1",
            "pretrain_seconds",
            "peak_memory_bytes",
        ]
        for key in keys:
            if all(key in r for r in mine):
                entry[key] = report.interval([r[key] for r in mine])
        table.append(entry)
    differences = []
    for a, b in COMPARISONS:
        if a in rows and (b in rows or b == RANDOM_INIT):
            d = {"a": a, "b": b}
            for t in args.tasks:
                d[t] = report.paired(runs, a, b, f"{t}_top1")
            differences.append(d)
    return {
        "name": extra["name"], "commit": extra["commit"], "machine": f"{os.cpu_count()} CPUs",
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "fresh", "table", "name")},
        "tasks": args.tasks, "chance": {t: CHANCE[t] for t in args.tasks}, "test_clips": extra["test_clips"],
        "tokenizer_seconds": extra["tokenizer_seconds"], "seconds": round(time.perf_counter() - extra["started"], 1),
        "complete": extra["complete"], "table": table, "differences": differences, "runs": runs,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, short runs, fewer videos (< 10 minutes)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default 5; quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="LVMAE pretraining steps (default 600; quick 100)")
    p.add_argument("--tokenizer-steps", type=int, default=None, help="default 400; quick 60")
    p.add_argument("--tasks", nargs="+", default=["order", "drift", "color"], choices=list(CHANCE),
                   help="the first is pretrained on; each is probed (a control: LVMAE and random-init only)")  # fmt: skip
    p.add_argument(
        "--videos", type=int, default=None, help="videos per task, half of them test (600; quick 80)"
    )
    p.add_argument("--probe-epochs", type=int, default=None, help="default 40; quick 100")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--rows", nargs="*", default=None, help="row names (default: all)")
    p.add_argument("--work", default=None, help="working folder (default bench/work/ablations[_quick])")
    p.add_argument("--fresh", action="store_true", help="delete the working folder first")
    p.add_argument("--table", action="store_true", help="write the results file's table into the docs")
    p.add_argument(
        "--name",
        default=None,
        help="results file bench/results/NAME.json (ablations; quick: ablations_quick)",
    )
    args = p.parse_args(argv)
    q = args.quick
    name = args.name or ("ablations_quick" if q else "ablations")
    if args.table:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        write_between(DOC, report.markers(name), report.markdown(result))
        print(report.markdown(result))
        return 0
    args.seeds = args.seeds or (1 if q else 5)
    args.steps = args.steps or (100 if q else 600)
    args.tokenizer_steps = args.tokenizer_steps or (60 if q else 400)
    args.videos = args.videos or (80 if q else 600)
    # about 500-700 probe steps either way: the probe's training is most of a probe's cost
    args.probe_epochs = args.probe_epochs or (100 if q else 40)
    root = Path(args.work or REPO / "bench" / "work" / name).absolute()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    rows = args.rows or list(ROWS)
    pre = args.tasks[0]
    started = time.perf_counter()

    print(f"data: {args.videos} videos of each task ({', '.join(args.tasks)}) -> clips", flush=True)
    data: dict[str, Any] = {**prepare_data(root, args), "pretrain_task": pre}
    print(f"tokenizer: {args.tokenizer_steps} steps, then its tokens", flush=True)
    t0 = time.perf_counter()
    tokens = prepare_tokens(root, data, pre, args.tokenizer_steps)
    schedules, run_names, matched = plans(rows, args.steps)
    # the code that ran: recorded once, at the start (a bench may run across sittings and commits)
    commit = short_commit()
    extra: dict[str, Any] = {
        "name": name, "started": started, "tokenizer_seconds": round(time.perf_counter() - t0, 1),
        "complete": False, "test_clips": {}, "rows": {}, "commit": commit,
    }  # fmt: skip
    for row in rows:
        batch, steps = schedules[row]
        same = next(r for r in rows if run_names[r] == run_names[row])
        extra["rows"][row] = {
            "batch": batch,
            "steps": steps,
            **matched[row],
            **({"same_as": same} if same != row else {}),
        }
        print(f"  {row}: {batch} clips x {steps} steps {matched[row] or ''}", flush=True)

    own = [r for r in rows if "same_as" not in extra["rows"][r]]
    # seed by seed, so that an interrupted bench has every row at the seeds it finished
    jobs = [(row, seed) for seed in range(args.seeds) for row in [*own, RANDOM_INIT]]
    print(f"pretraining: {args.seeds * len(own)} runs, {args.jobs} at a time", flush=True)
    runs: list[dict[str, Any]] = []
    lock = threading.Lock()

    def save(figures: dict[str, Any] | None = None) -> None:
        """After every run: an interrupted bench keeps what it measured (and resumes from its folders)."""
        with lock:
            runs.extend([figures] if figures else [])
            RESULTS.mkdir(exist_ok=True)
            out = RESULTS / f"{name}.json"
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(summarize(args, rows, runs, extra), indent=1) + "\n")
            tmp.replace(out)

    def probes(figures: dict[str, Any], source: Path, seed: int, random_init: bool, views: bool) -> None:
        """views: also the control task, and order on four 32-frame windows (LVMAE and random-init)."""
        for task in [t for t in args.tasks if views or t not in CONTROLS]:
            r = probe(root, source, task, data, seed, random_init, args.probe_epochs)
            figures[f"{task}_top1"] = r["test"]["top1"]
            extra["test_clips"][task] = r["test"]["num_clips"]
        if views and pre == "order":  # a 128-frame encoder on 4 windows of 32 frames: can it still tell?
            r = probe(root, source, "order", data, seed, random_init, args.probe_epochs, frames=32)
            figures["order_32f_views_top1"] = r["test"]["top1"]

    def one(job: tuple[str, int]) -> None:
        row, seed = job
        if row == RANDOM_INIT:
            return baseline(seed)
        out = pretrain(root, run_names[row], row, seed, data, tokens, schedules[row])
        summary = json.loads((out / "summary.json").read_text())
        figures = {
            "row": row, "seed": seed, "pretrain_seconds": summary["seconds"],
            "peak_memory_bytes": summary["peak_memory"]["bytes"], "peak_memory_kind": summary["peak_memory"]["kind"],
        }  # fmt: skip
        probes(figures, out / "export", seed, False, row == LVMAE)
        print(f"  {row} seed {seed}: " + ", ".join(f"{t} {100 * figures[f'{t}_top1']:.1f}%" for t in args.tasks if f"{t}_top1" in figures)
              + f" ({summary['seconds']:.0f} s pretraining)", flush=True)  # fmt: skip
        for alias in [r for r in rows if extra["rows"][r].get("same_as") == row]:
            save({**figures, "row": alias})
        save(figures)

    def baseline(seed: int) -> None:
        figures: dict[str, Any] = {"row": RANDOM_INIT, "seed": seed}
        probes(figures, random_export(root), seed, True, True)
        save(figures)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, jobs))
    extra["complete"] = True
    save()
    result = json.loads((RESULTS / f"{name}.json").read_text())
    print(report.markdown(result))
    report.plot(result, RESULTS / f"{name}.png")
    print(f"\n{RESULTS / (name + '.json')}, {RESULTS / (name + '.png')}; {result['seconds']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
