"""Checkpoint upload time to object storage (run.out=s3://...), through the real DeepSpeed engine.

Each recipe runs in a fresh process (one rank, the recipe's ZeRO stage and precision): its model is built
under zero.Init, wrapped by the engine with AdamW and trained for one step on a synthetic batch (so the
optimizer state exists), then saved --saves times with train.checkpoint.StoredCheckpoints to a local S3
server (SeaweedFS `weed mini` on loopback, started here): written into a local stage, uploaded, committed.
The figures are the checkpoint's size, the whole save and the upload (first part upload to `latest`).

    .venv/bin/python bench/checkpoint_upload.py                      # demo_cpu, and demo_cpu at preset small
    .venv/bin/python bench/checkpoint_upload.py --recipes "demo_cpu:model.preset=base" --saves 2

Writes bench/results/checkpoint_upload_<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

from fig1_memory import result_row, save_runs  # noqa: E402

MIB = 2**20


def run_one(recipe: str, saves: int, url: str, stage: str, overrides: list[str]) -> dict:
    """One recipe, in this process (a rank of its own), saved `saves` times to run folder `url`."""
    import torch

    from train.checkpoint import StoredCheckpoints
    from train.config import load_train_config, saved_yaml
    from train.dist import join_process_group
    from train.engine import build_engine, model_init_context, resolve_precision
    from train.rundir import RunDir
    from train.tasks import MAETask
    from train.trainer import step_seed

    cfg = load_train_config(
        [REPO / "configs" / f"{recipe}.yaml"], ["data.url=synthetic", "data.tokens=synthetic", *overrides]
    )
    join_process_group()
    task = MAETask(cfg)
    precision = resolve_precision(cfg.run.precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    with model_init_context(cfg):
        model = task.build_model()
    engine, _, _ = build_engine(model, cfg, world_size=1)
    v, b = task.model_cfg.video, cfg.data.batch_size
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(b, v.in_chans, v.num_frames, v.img_size, v.img_size, generator=gen).to(dtype)
    batch = {
        "codes": torch.randint(0, task.model_cfg.target.codebook_size, (b, *v.grid), generator=gen),
        "priority": torch.rand(b, *v.grid, generator=gen),
    }
    loss = task.loss(engine, batch, video, torch.Generator().manual_seed(step_seed(0, 0, 0)), 0)
    engine.backward(loss)
    engine.step()

    run = RunDir(url, stage)
    ckpts = StoredCheckpoints(run, rank=0, world_size=1, keep_last=2)
    config_yaml = saved_yaml(cfg)
    save_s, upload_s, sizes = [], [], []
    for i in range(1, saves + 1):
        started = time.perf_counter()
        path = ckpts.save(engine, i, {"step": i}, config_yaml)
        save_s.append(time.perf_counter() - started)
        upload_s.append(ckpts.upload_seconds)
        sizes.append(sum(p.stat().st_size for p in path.iterdir() if p.is_file()))
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    return {
        "recipe": recipe,
        "overrides": overrides,
        "preset": cfg.model.preset,
        "params": n_params,
        "precision": precision,
        "zero_stage": cfg.run.zero_stage,
        "checkpoint_bytes": sizes[-1],
        "save_s": [round(t, 3) for t in save_s],
        "upload_s": [round(t, 3) for t in upload_s],
        "median_upload_s": round(statistics.median(upload_s), 3),
        "upload_mib_per_s": round(sizes[-1] / MIB / statistics.median(upload_s), 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | preset | params (M) | checkpoint (MiB) | save incl. upload (s, median) | upload (s, median) "
        "| MiB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['preset']} | {r['params'] / 1e6:.1f} | {r['checkpoint_bytes'] / MIB:.1f} | "
            f"{statistics.median(r['save_s']):.2f} | {r['median_upload_s']:.2f} | {r['upload_mib_per_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--recipes",
        nargs="+",
        default=["demo_cpu", "demo_cpu:model.preset=small"],
        help="recipe names in configs/, each optionally with its own overrides: NAME:key=value,key=value",
    )
    p.add_argument("--saves", type=int, default=3, help="checkpoints saved (and uploaded) per recipe")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one recipe in this process
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        row = run_one(args.one, args.saves, args.url, args.stage, args.override)
        print("RESULT " + json.dumps(row), flush=True)
        return

    from ingest.objectstore import LocalS3Server

    rows = []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp, LocalS3Server(Path(tmp) / "s3") as s3:
        bucket = s3.create_bucket("bench")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env |= {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": s3.access_key}
        env |= {"AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}
        for i, spec in enumerate(args.recipes):
            recipe, _, own = spec.partition(":")
            cmd = [sys.executable, __file__, "--one", recipe, "--saves", str(args.saves)]
            cmd += [f"--url={bucket}/run{i}", f"--stage={tmp}/stage{i}"]
            cmd += [f"--override={o}" for o in filter(None, own.split(","))]
            row = result_row(cmd, spec, env)
            rows.append(row)
            print(
                f"{spec}: {row['checkpoint_bytes'] / MIB:.1f} MiB, upload {row['median_upload_s']} s "
                f"({row['upload_mib_per_s']} MiB/s)",
                flush=True,
            )
    store = "SeaweedFS weed mini on 127.0.0.1 (ingest.objectstore.LocalS3Server)"
    out = save_runs(args.out, "checkpoint_upload", rows, store=store)
    print(table(rows))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
