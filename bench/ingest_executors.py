"""Ingest executors: `lvmae ingest clips` with local processes against the same run on Ray.

A small generated corpus (`lvmae ingest synth`'s `order` task: --videos videos of --video-frames frames at
--video-size px, H.264) is cut into --frames-frame clips at --size px, --shard-clips clips per shard, once
with the local executor (--workers processes) and once with `--executor ray` on a local Ray of --workers
CPUs, --repeats times each, interleaved. Ray's start-up (about 4 s here) is timed apart: the Ray rows time
the ingest on a running instance, as on a cluster that is already up. Both executors must write the same
bytes; the script checks that every run's index.json (which carries every shard's sha256) is the same.

    .venv/bin/python bench/ingest_executors.py [--videos 48] [--workers 2] [--repeats 3]

Needs Ray (pip install lvmae[ray]). Writes bench/results/ingest_executors.json; never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.ray_executor import ray_session


def run_ingest(manifest: Path, out: Path, cfg: IngestConfig, executor: str) -> dict:
    """One ingest into a fresh `out`; -> its figures and the index it wrote."""
    started = time.perf_counter()
    summary = ingest_clips([str(manifest)], str(out), cfg, progress=False, executor=executor)
    seconds = time.perf_counter() - started
    return {
        "executor": executor,
        "clips": summary.samples_written,
        "seconds": round(seconds, 2),
        "clips_per_s": round(summary.samples_written / seconds, 2),
        "index": (out / "index.json").read_text(),
    }


def summarize(runs: list[dict]) -> dict:
    rates = [r["clips_per_s"] for r in runs]
    return {
        "runs": len(rates),
        "clips_per_s_median": round(statistics.median(rates), 2),
        "clips_per_s": rates,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=48, help="generated source videos (default 48)")
    parser.add_argument("--video-frames", type=int, default=128, help="frames per source video (default 128)")
    parser.add_argument("--video-size", type=int, default=128, help="source frame side in px (default 128)")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip (default 32)")
    parser.add_argument("--size", type=int, default=112, help="clip side in px (default 112)")
    parser.add_argument("--shard-clips", type=int, default=4, help="clips per shard (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="local processes, and the local Ray's CPUs")
    parser.add_argument("--repeats", type=int, default=3, help="runs per executor (default 3)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    # Here, not at the top: spawned pool workers import this module, and this one imports torch (1.5 s).
    from ingest.synth import write_benchmark

    spec = ClipSpec(num_frames=args.frames, size=args.size)
    cfg = IngestConfig(clip=spec, shard_clips=args.shard_clips, workers=args.workers)
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lvmae-bench-exec-") as tmp:
        work = Path(tmp)
        manifest = write_benchmark(
            work / "corpus", "order", args.videos, args.video_frames, args.video_size, progress=False
        )
        started = time.perf_counter()
        with ray_session(None, num_cpus=args.workers) as ray:
            ray_start_s = round(time.perf_counter() - started, 2)
            ray_version = ray.__version__
            for i in range(args.repeats):
                for executor in ("local", "ray"):
                    run = run_ingest(manifest, work / f"{executor}-{i}", cfg, executor)
                    runs[executor].append(run)
                    print(json.dumps({k: v for k, v in run.items() if k != "index"}), flush=True)
    identical = len({r["index"] for rs in runs.values() for r in rs}) == 1
    for rs in runs.values():
        for r in rs:
            del r["index"]
    result = {
        "machine": {
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray_version,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "corpus": {
            "task": "order",
            "videos": args.videos,
            "video_frames": args.video_frames,
            "video_size": args.video_size,
        },
        "clip_spec": {"frames": args.frames, "size": args.size, "shard_clips": args.shard_clips},
        "workers": args.workers,
        "ray_start_s": ray_start_s,
        "identical_output": identical,
        "local": {**summarize(runs["local"]), "rows": runs["local"]},
        "ray": {**summarize(runs["ray"]), "rows": runs["ray"]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest_executors.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| executor | clips/s (median of {args.repeats}) | runs |\n|---|---|---|")
    for name, label in (("local", f"local, {args.workers} processes"), ("ray", f"ray, {args.workers} CPUs")):
        row = result[name]
        print(f"| {label} | {row['clips_per_s_median']} | {', '.join(map(str, row['clips_per_s']))} |")
    print(f"Ray start-up: {ray_start_s} s (not in the Ray rows); identical output: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
