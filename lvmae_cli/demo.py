"""`make demo`: the pipeline end to end on the embedded default (local store, generated videos, CPU).

1. `lvmae ingest synth` + `lvmae ingest clips`: procedural benchmark videos (docs/evaluation.md) -> 128-frame
   32 px VP9 clip shards + index.json, with labels and train / val / test splits made by source video.
2. `lvmae launch --nproc 2 -- train tokenizer`: a tiny FSQ-MagViT tokenizer and token scorer, fitted on
   the train split by two DeepSpeed ZeRO-3 processes; then `lvmae eval tokenizer`'s figures for it
   (reconstruction, codebook use, what its priority picks) and its PNG.
3. `lvmae ingest tokens`: its codes and priorities for every clip, into the Zarr token store.
4. `lvmae launch --nproc 2 -- train mae`: a tiny LVMAE on 128-frame clips (adaptive decoder mask on the
   top-priority 15% of tokens, token targets) on the train split, two ZeRO-3 processes with their
   Prometheus endpoints live, stopped at a checkpoint half way and resumed from it (`--resume auto`).
5. `lvmae eval probe`: an attentive probe on the frozen pretrained encoder, trained on the train split
   and scored on the held-out test videos, against the same probe on a random-init encoder.
6. A summary (losses, throughput, the probe's scores, where everything is) and PNGs: one clip with its
   priorities, masks and reconstructions; test clips with their true and predicted labels.

`--store s3` does the same against a local S3 server (SeaweedFS on 127.0.0.1, started here). Every step
resumes: running the demo again skips what is done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from train.dist import free_port

REPO = Path(__file__).resolve().parents[1]
SHOWN = re.compile(r"^(step |checkpoint |resumed |exported |lvmae train|removed |eval at step )|error:")


def scrape(port: int, names: tuple[str, ...]) -> list[str]:
    """Lines of a Prometheus endpoint whose metric is in `names`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return [line for line in text.splitlines() if line.split("{")[0].split(" ")[0] in names]


def launch(what: str, args: list[str], log: Path, metrics_port: int | None = None) -> None:
    """`lvmae launch --nproc 2 -- train WHAT ARGS...`: rank 0's progress on the console, everything in
    `log`. With metrics_port, rank 0's endpoint is read once while it trains and shown."""
    cmd = [sys.executable, "-m", "lvmae_cli", "launch", "--nproc=2", f"--master-port={free_port()}"]
    cmd += ["--", "train", what, *args]
    shown_metrics = metrics_port is None
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if SHOWN.match(line):
                print("  " + line.rstrip(), flush=True)
            if not shown_metrics and line.startswith("step "):
                shown_metrics = True
                with contextlib.suppress(OSError):
                    names = ("lvmae_train_steps_total", "lvmae_train_samples_total", "lvmae_train_loss")
                    got = scrape(metrics_port, names)  # type: ignore[arg-type]
                    print(f"  metrics live at http://127.0.0.1:{metrics_port}/metrics (rank 0), e.g.:")
                    for m in got:
                        print(f"    {m}")
    if proc.wait() != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        sys.exit(
            f"{tail}\ndemo: `lvmae launch ... train {what}` failed (exit {proc.returncode}); all of it in {log}"
        )


def latest_step(run: Path) -> int:
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.is_file() else 0


def head_tail(values: list[float]) -> tuple[float, float]:
    """Means of the first and the last tenth."""
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--task", default="order", help="benchmark task (lvmae ingest synth --list)")
    parser.add_argument("--videos", type=int, default=240, help="benchmark videos (one 128-frame clip each)")
    parser.add_argument("--tokenizer-steps", type=int, default=150)
    parser.add_argument("--mae-steps", type=int, default=300, help="the run stops half way and resumes")
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument(
        "--seed", type=int, default=0, help="of the tokenizer's and LVMAE's runs and the probes"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    with contextlib.ExitStack() as stack:
        if args.store == "s3":
            from ingest.objectstore import LocalS3Server

            s3 = stack.enter_context(LocalS3Server(out / "s3"))
            # Credentials reach every process through the standard AWS environment, never a config.
            os.environ.update(
                {
                    "AWS_ACCESS_KEY_ID": s3.access_key,
                    "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                    "AWS_ENDPOINT_URL": s3.endpoint_url,
                    "AWS_DEFAULT_REGION": "us-east-1",
                }
            )
            if not s3.filesystem().exists("lvmae-demo"):
                s3.create_bucket("lvmae-demo")
            data = "s3://lvmae-demo/data"
            print(f"local S3 server at {s3.endpoint_url} (data in {out / 's3'})")
        else:
            data = str(out / "data")
        summary = run_pipeline(args, out, data)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    return 0


def run_pipeline(args: argparse.Namespace, out: Path, data: str) -> dict:
    from evals.figures import save_eval_curve
    from ingest.clips import IngestError, ingest_clips
    from ingest.config import ClipSpec, IngestConfig
    from ingest.storage import Store
    from ingest.synth import write_benchmark
    from ingest.tokens import TokensError, ingest_tokens
    from train.runlog import eval_records, read_log

    logs = out / "logs"
    print(
        f"1/6 ingest: {args.videos} generated `{args.task}` videos -> 128-frame 32 px clips in {data}, "
        "split by source video",
        flush=True,
    )
    manifest = write_benchmark(out / "videos", args.task, args.videos, num_frames=128, size=32, progress=True)
    # eight shards or so, whatever --videos: each of the two ranks needs shards of the train split
    ingest_cfg = IngestConfig(
        clip=ClipSpec(num_frames=128, size=32),
        shard_clips=max(2, args.videos // 8),
        test_share=0.25,
        workers=2,
    )
    try:
        ingest = ingest_clips([str(manifest)], data, ingest_cfg, progress=True)
    except IngestError as err:  # a demo folder an older lvmae made (its videos were coded differently)
        if "already holds a different data set" not in str(err):
            raise
        print("  this demo folder was made by an older lvmae: starting it again", flush=True)
        start_over(out, data)
        ingest = ingest_clips([str(manifest)], data, ingest_cfg, progress=True)
    counts = {split: sum(c.values()) for split, c in ingest.labels["counts"].items()}
    print(f"  {ingest.num_samples} clips in {ingest.shards} shards; clips per split: {counts}", flush=True)

    print("2/6 train tokenizer: 2 processes, DeepSpeed ZeRO-3, on the train split", flush=True)
    tok_run = out / "runs" / "tokenizer"
    steps = args.tokenizer_steps
    tok_args = ["configs/tokenizer_demo_128f_cpu.yaml", f"data.url={data}", f"run.out={tok_run}"]
    tok_args += [
        f"run.steps={steps}",
        f"optim.total_steps={steps}",
        f"optim.warmup_steps={min(10, steps // 4)}",
    ]
    tok_args += ["run.metrics_port_base=0", f"run.seed={args.seed}"]
    launch("tokenizer", [*tok_args, "--resume", "auto"], logs / "tokenizer.log")
    from evals.tokenizer_eval import run_eval_tokenizer, summary_lines

    tok_eval = run_eval_tokenizer(str(tok_run / "tokenizer"), data, out=str(out / "tokenizer-eval"), clips=32)
    print(f"  lvmae eval tokenizer on {tok_eval['clips']} clips:", flush=True)
    for line in summary_lines(tok_eval):
        print(f"    {line}", flush=True)

    print("3/6 ingest tokens: the frozen tokenizer's codes and priorities -> Zarr", flush=True)
    try:
        tokens = ingest_tokens(data, str(tok_run / "tokenizer"), device="cpu", progress=True)
    except TokensError as err:  # a demo folder from an older lvmae: its token store is rebuilt
        if "is a token store of format" not in str(err):
            raise
        store = Store(data)
        print("  the demo's token store is of an older format: rebuilding it", flush=True)
        store.fs.rm(store.path("tokens"), recursive=True)
        tokens = ingest_tokens(data, str(tok_run / "tokenizer"), device="cpu", progress=True)
    print(f"  {tokens.num_valid} clips -> {tokens.store}", flush=True)

    print(
        "4/6 train mae: tiny LVMAE on 128-frame clips, adaptive decoder mask (15% of tokens), token "
        "targets, 2 processes, train split",
        flush=True,
    )
    mae_run = out / "runs" / "mae"
    restart_if_older(mae_run)
    total, half = args.mae_steps, args.mae_steps // 2
    mae_args = ["configs/demo_128f_cpu.yaml", f"data.url={data}", f"data.tokens={tokens.tokenizer_id}"]
    mae_args += [
        f"run.out={mae_run}",
        f"optim.total_steps={total}",
        f"optim.warmup_steps={min(20, total // 4)}",
    ]
    mae_args += [f"run.checkpoint_every={half}", f"run.seed={args.seed}"]
    # the health probe inside the run: k-NN on the val videos at step 0 (random init), every sixth of the
    # run and at its end; the best step's checkpoint is kept
    mae_args += [f"eval.every={max(1, total // 6)}", "eval.split=val", "run.keep_best=true"]
    port = free_port(pair=True)
    if latest_step(mae_run) < half:
        print(f"  first launch: to step {half}, then stop", flush=True)
        run_args = [*mae_args, f"run.steps={half}", f"run.metrics_port_base={port}", "--resume", "auto"]
        launch("mae", run_args, logs / "mae.log", metrics_port=port)
    print(f"  second launch: --resume auto from the checkpoint, to step {total}", flush=True)
    run_args = [*mae_args, f"run.steps={total}", f"run.metrics_port_base={port}", "--resume", "auto"]
    launch("mae", run_args, logs / "mae.log", metrics_port=port)

    print("5/6 probe: attentive probe on the frozen encoder, held-out test videos", flush=True)
    from evals.probe import ProbeConfig, run_probe, summary_line

    probes = {}
    for kind, random_init in (("pretrained", False), ("random_init", True)):
        cfg = ProbeConfig(epochs=args.probe_epochs, random_init=random_init, seed=args.seed)
        probes[kind] = run_probe(str(mae_run / "export"), data, cfg, out=str(out / "probe" / kind))
        print(f"  {summary_line(probes[kind])}", flush=True)

    hf_export = export_to_transformers(mae_run / "export", data, out / "hf")
    print(
        f"  lvmae export hf -> {hf_export['dir']}: transformers' VideoMAEModel gives the same features "
        f"(max abs difference {hf_export['max_abs_diff']:.2g} on a test clip)",
        flush=True,
    )

    print("6/6 figure: one clip, its priorities, masks and reconstructions", flush=True)
    figure, accuracy = draw(data, tokens.tokenizer_id, tok_run / "tokenizer", mae_run / "export", out)
    tok_log, mae_log = read_log(tok_run / "train_log.jsonl"), read_log(mae_run / "train_log.jsonl")
    evals = eval_records(mae_log)
    eval_png = save_eval_curve(
        evals, out / "lvmae_demo_eval.png", "the health probe inside the demo's LVMAE run"
    )
    mae_log = [r for r in mae_log if "loss" in r]
    runs = {
        name: json.loads((run / "summary.json").read_text())
        for name, run in (("tokenizer", tok_run), ("mae", mae_run))
    }
    test = {kind: r["test"] for kind, r in probes.items()}
    return {
        "store": data,
        "clips": ingest.num_samples,
        "clips_per_split": counts,
        "tokenizer_id": tokens.tokenizer_id,
        "tokenizer_recon_mse_first_last": [round(x, 4) for x in head_tail([r["loss"] for r in tok_log])],
        "tokenizer_eval": {
            k: tok_eval[k] for k in ("psnr_db", "ssim", "used_share", "perplexity", "priority")
        },
        "mae_token_loss_first_last": [round(x, 4) for x in head_tail([r["loss"] for r in mae_log])],
        "mae_steps": [r["step"] for r in mae_log][-1],
        "clips_per_s": {"tokenizer": runs["tokenizer"]["clips_per_s"], "mae": runs["mae"]["clips_per_s"]},
        "selected_code_accuracy": round(accuracy, 3),
        "in_run_eval": {
            "split": evals[0]["split"],
            "clips": evals[0]["clips"],
            "chance": evals[0]["chance"],
            "steps": [e["step"] for e in evals],
            "knn_top1": [e["knn_top1"] for e in evals],
            "effective_rank": [e["effective_rank"] for e in evals],
            "feature_spread": [e["feature_spread"] for e in evals],
            "best": runs["mae"]["eval"]["best"],
        },
        "hf_export": hf_export,
        "probe": {
            "pretrained_top1": test["pretrained"]["top1"],
            "random_init_top1": test["random_init"]["top1"],
            "task": args.task,
            "num_test_clips": test["pretrained"]["num_clips"],
            "chance": test["pretrained"]["chance"],
            "num_train_clips": probes["pretrained"]["num_train_clips"],
        },
        "artefacts": {
            "videos": str(manifest),
            "data": data,
            "token_store": tokens.store,
            "tokenizer": str(tok_run / "tokenizer"),
            "mae_weights": str(mae_run / "export"),
            "checkpoints": str(mae_run / "checkpoints"),
            "train_logs": [str(tok_run / "train_log.jsonl"), str(mae_run / "train_log.jsonl")],
            "prometheus_targets": str(out / "runs" / "prometheus-targets"),
            "figure": str(figure),
            "eval_curve": str(eval_png),
            "tokenizer_eval": tok_eval["json"],
            "tokenizer_figure": tok_eval["figure"],
            "probe": probes["pretrained"]["json"],
            "probe_examples": probes["pretrained"].get("examples_png"),
            "probe_confusion": probes["pretrained"]["confusion_png"],
        },
    }


def start_over(out: Path, data: str) -> None:
    """Delete what the demo made in `out` (its data set, local or on the store, and its runs and
    reports); the generated videos stay (they are written again only where they differ)."""
    import shutil

    from ingest.storage import Store

    store = Store(data)
    if store.exists(""):
        store.fs.rm(store.path(""), recursive=True)
    for name in ("runs", "probe", "tokenizer-eval", "hf"):
        shutil.rmtree(out / name, ignore_errors=True)


def restart_if_older(run: Path) -> None:
    """Delete the demo's MAE run if an older lvmae started it (its config predates model.pos_embed): its
    checkpoints hold the old position table, which a resume under today's recipe refuses."""
    import shutil

    from omegaconf import OmegaConf

    saved = run / "config.yaml"
    if saved.is_file() and "pos_embed" not in (
        OmegaConf.to_container(OmegaConf.load(saved)).get("model") or {}
    ):
        print(
            f"  {run} was started by an older lvmae (before model.pos_embed): starting it again", flush=True
        )
        shutil.rmtree(run)


def export_to_transformers(export: Path, data: str, out: Path) -> dict:
    """`lvmae export hf` of the pretrained encoder, loaded back by transformers' VideoMAEModel and compared
    with lvmae's encoder on one test clip."""
    import torch

    from lvmae_cli.weights_cmd import check_export, export_hf
    from train.loader import ClipLoader

    export_hf(str(export), str(out))
    loader = ClipLoader(data, 1, decoder="pyav", shuffle_buffer=0, epochs=1, split="test")
    video = next(iter(loader))["video"][0]  # (3, T, H, W) = uint8 / 255: rounds back exactly
    clip = (video * 255).round().clamp(0, 255).to(torch.uint8)
    return {"dir": str(out), "max_abs_diff": check_export(str(export), str(out), clip)}


def draw(data: str, tokenizer_id: str, tokenizer_dir: Path, export: Path, out: Path) -> tuple[Path, float]:
    from evals.figures import reconstruct, save_figure
    from lvmae.tokenizer import load_tokenizer
    from lvmae.weights import load_mae
    from train.loader import ClipLoader

    loader = ClipLoader(data, 1, tokens=tokenizer_id, decoder="pyav", shuffle_buffer=0, epochs=1)
    batch = next(iter(loader))
    maps = reconstruct(
        load_mae(export), load_tokenizer(tokenizer_dir), batch["video"], batch["codes"], batch["priority"]
    )
    accuracy = float(maps["code_accuracy"])
    title = f"clip {batch['keys'][0]}: predicted codes right at {100 * accuracy:.0f}% of the rebuilt tokens"
    return save_figure(maps, out / "lvmae_demo.png", title), accuracy


# A rank correlation with the frame difference below this: the summary says why (issue 21).
PRIORITY_FOLLOWS_MOTION = 0.3


def print_summary(s: dict, out: Path) -> None:
    t0, t1 = s["tokenizer_recon_mse_first_last"]
    m0, m1 = s["mae_token_loss_first_last"]
    print()
    print(f"demo done in {s['seconds']} s ({s['clips']} clips of 128 frames, store {s['store']})")
    print(
        f"  tokenizer {s['tokenizer_id']}: reconstruction MSE {t0:.4f} -> {t1:.4f} (first -> last tenth of steps)"
    )
    te = s["tokenizer_eval"]
    print(
        f"  tokenizer at inference: PSNR {te['psnr_db']:.1f} dB, {100 * te['used_share']:.0f}% of codes used; "
        f"priority vs frame difference: rank correlation {te['priority']['frame_diff_spearman']:.2f}"
    )
    if te["priority"]["frame_diff_spearman"] < PRIORITY_FOLLOWS_MOTION:
        print(
            f"    (below {PRIORITY_FOLLOWS_MOTION}: in the demo's few tokenizer steps the scorer has not learned to "
            "follow motion yet; trained longer on clips whose moving things it can rebuild, it does: "
            "docs/tokenizer.md, bench/priority_families.py)"
        )
    print(f"  LVMAE ({s['mae_steps']} steps, resumed once): token loss {m0:.3f} -> {m1:.3f}")
    e = s["in_run_eval"]
    print(
        f"  in-run health probe (k-NN on {e['clips'][1]} {e['split']} clips, chance {100 * e['chance']:.0f}%): "
        f"step 0 (random init) {100 * e['knn_top1'][0]:.1f}% -> step {e['steps'][-1]} "
        f"{100 * e['knn_top1'][-1]:.1f}%, best {100 * e['best']['knn_top1']:.1f}% at step "
        f"{e['best']['step']} (its checkpoint kept); effective rank {e['effective_rank'][0]:.1f} -> "
        f"{e['effective_rank'][-1]:.1f}"
    )
    p = s["probe"]
    print(
        f"  probe on `{p['task']}` ({p['num_test_clips']} held-out test clips, chance {100 * p['chance']:.0f}%): "
        f"pretrained encoder {100 * p['pretrained_top1']:.1f}% top-1, random-init encoder "
        f"{100 * p['random_init_top1']:.1f}%"
    )
    print(
        f"  throughput: tokenizer {s['clips_per_s']['tokenizer']} clips/s, LVMAE {s['clips_per_s']['mae']} clips/s (2 CPU processes)"
    )
    print(
        f"  decoder-selected tokens whose code LVMAE predicts exactly: {100 * s['selected_code_accuracy']:.0f}%"
    )
    print("  artefacts:")
    for name, where in s["artefacts"].items():
        print(f"    {name:<19} {where}")
    print(f"  summary: {out / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
