"""How long a store outage a training run survives, and what it costs: a 2-rank run streaming its clips and
tokens from a local S3 server (SeaweedFS) that is killed mid-run for --outage-s seconds, then restarted on
the same port and data. The same run on the local copy of the data is the reference: the run must finish
with identical losses. Prints and saves the wall times, the retries and the stall.

    .venv/bin/python bench/store_outage.py                  # a 240 s outage (the deadline is 300 s)
    .venv/bin/python bench/store_outage.py --outage-s 60

Writes bench/results/store_outage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

LVMAE = [sys.executable, "-m", "lvmae_cli"]
VIDEO = ["model.video.num_frames=8", "model.video.img_size=32", "model.video.patch_size=8"]


def make_data(root: Path) -> tuple[Path, str]:
    """8-frame 32 px clips of the four sample videos and a fresh tiny tokenizer's token store."""
    import torch

    from ingest.clips import ingest_clips
    from ingest.config import ClipSpec, IngestConfig
    from ingest.samples import sample_videos
    from ingest.tokens import ingest_tokens
    from lvmae.config import VideoSpec
    from lvmae.tokenizer import Tokenizer, save_tokenizer
    from lvmae.tokenizer_config import TokenizerConfig

    sources = [str(p) for p in sample_videos().values()]
    ingest_clips(
        sources, str(root / "data"), IngestConfig(clip=ClipSpec(8, 32), shard_clips=4), progress=False
    )
    torch.manual_seed(0)
    tok = TokenizerConfig(
        video=VideoSpec(num_frames=8, img_size=32, patch_size=8),
        base_channels=8,
        channel_mult=[1, 1, 2, 2],
        num_groups=4,
        scorer_channels=8,
        fsq_levels=[8, 5, 5],
    )
    tid = save_tokenizer(Tokenizer(tok).eval(), root / "tokenizer")
    ingest_tokens(str(root / "data"), str(root / "tokenizer"), device="cpu", progress=False)
    return root / "data", tid


def run(url: str, tid: str, out: Path, steps: int, env: dict[str, str]) -> subprocess.Popen:
    args = [
        "train",
        "mae",
        str(REPO / "configs/demo_cpu.yaml"),
        *VIDEO,
        "model.target.fsq_levels=[8,5,5]",
        f"data.url={url}",
        f"data.tokens={tid}",
        "data.batch_size=2",
        "data.shuffle_buffer=8",
        "optim.warmup_steps=3",
        f"run.steps={steps}",
        "run.checkpoint_every=0",
        "run.metrics_port_base=0",
        f"run.out={out}",
    ]
    cmd = [*LVMAE, "launch", "--nproc=2", "--", *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def losses(out: Path) -> list[tuple[int, float]]:
    from train.runlog import read_log

    return [(r["step"], r["loss"]) for r in read_log(out / "train_log.jsonl")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage-s", type=float, default=240.0, help="seconds the server stays down")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--kill-at-step", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench/results/store_outage.json"))
    args = ap.parse_args()

    from ingest.objectstore import LocalS3Server

    with tempfile.TemporaryDirectory(prefix="outage-") as tmp:
        root = Path(tmp)
        local, tid = make_data(root)
        t0 = time.perf_counter()
        ref = run(str(local), tid, root / "ref", args.steps, dict(os.environ))
        ref_text, _ = ref.communicate()
        ref_s = time.perf_counter() - t0
        if ref.returncode != 0:
            print(ref_text[-3000:])
            return 1
        with LocalS3Server(root / "s3") as server:
            fs = server.filesystem()
            server.create_bucket("bench")
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                fs.put_file(str(path), f"bench/data/{path.relative_to(local)}")
            env = os.environ | {
                "AWS_ACCESS_KEY_ID": server.access_key,
                "AWS_SECRET_ACCESS_KEY": server.secret_key,
                "AWS_ENDPOINT_URL": server.endpoint_url,
            }
            out, killed = root / "s3run", {}
            log = out / "train_log.jsonl"

            def outage() -> None:
                while not (log.is_file() and len(log.read_text().splitlines()) >= args.kill_at_step):
                    time.sleep(0.05)
                server.kill()
                killed["at"] = time.perf_counter()
                time.sleep(args.outage_s)
                server.start()
                killed["back"] = time.perf_counter()

            t0 = time.perf_counter()
            proc = run("s3://bench/data", tid, out, args.steps, env)
            thread = threading.Thread(target=outage, daemon=True)
            thread.start()
            text, _ = proc.communicate()
            s3_s = time.perf_counter() - t0
            thread.join(timeout=5)
        warnings = [line for line in text.splitlines() if line.startswith("warning: ")]
        failing = [float(m) for m in re.findall(r"failing for (\d+) s", text)]
        result = {
            "outage_s": args.outage_s,
            "steps": args.steps,
            "killed_at_step": args.kill_at_step,
            "finished": proc.returncode == 0,
            "losses_identical": proc.returncode == 0 and losses(out) == losses(root / "ref"),
            "reference_wall_s": round(ref_s, 1),
            "outage_run_wall_s": round(s3_s, 1),
            "extra_wall_s": round(s3_s - ref_s, 1),
            "warning_lines": len(warnings),
            "longest_wait_reported_s": max(failing, default=0.0),
            "first_warning": warnings[0] if warnings else None,
            "last_lines": text.splitlines()[-3:],
        }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["losses_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
