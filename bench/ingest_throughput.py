"""Ingest throughput: `lvmae ingest clips` against the ffmpeg command line doing the same work.

The same fixed corpus (the four real sample videos, copied --copies times) is cut into clips of
--frames frames at --size px, VP9 realtime, once by `lvmae ingest clips` and once by ffmpeg (one
process per source: decode once, scale short side + centre crop, VP9 encode, a segment per clip), each
with the same number of parallel processes. The figure is the ratio of clips per second. Optionally
also times `lvmae ingest tokens` with a freshly initialised tokenizer.

    .venv/bin/python bench/ingest_throughput.py [--frames 64] [--size 224] [--copies 6] [--workers 1 2]

Needs Debian's ffmpeg (apt-get install ffmpeg). Writes bench/results/ingest_<host>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.clip_plan import clip_starts
from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.probe import probe
from ingest.samples import sample_videos


def build_corpus(root: Path, copies: int) -> list[Path]:
    paths = []
    for i in range(copies):
        for name, src in sample_videos().items():
            dst = root / f"{name}-{i}.mp4"
            shutil.copy(src, dst)
            paths.append(dst)
    return paths


def ffmpeg_one(src: Path, out_dir: Path, frames: int, size: int) -> int:
    """Cut every whole clip of `src` with one ffmpeg process; -> clips written."""
    info = probe(str(src), str(src))
    n = len(clip_starts(info.frames, frames, 1.0, frames))
    if n == 0:
        return 0
    cuts = ",".join(str(frames * k) for k in range(1, n))
    vf = f"scale='if(lt(iw,ih),{size},-2)':'if(lt(iw,ih),-2,{size})':flags=area,crop={size}:{size}"
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-threads",
        "1",
        "-i",
        str(src),
        "-an",
        "-vf",
        vf,
        "-frames:v",
        str(n * frames),
    ]
    cmd += [
        "-c:v",
        "libvpx-vp9",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-row-mt",
        "1",
        "-crf",
        "32",
        "-b:v",
        "0",
    ]
    cmd += ["-threads", "1", "-pix_fmt", "yuv420p", "-force_key_frames", f"expr:eq(mod(n,{frames}),0)"]
    cmd += ["-f", "segment", "-segment_format", "webm"]
    cmd += ["-segment_frames", cuts] if cuts else []
    cmd += [str(out_dir / f"{src.stem}-%04d.webm")]
    subprocess.run(cmd, check=True)
    return n


def run_ffmpeg(corpus: list[Path], out_dir: Path, frames: int, size: int, workers: int) -> tuple[int, float]:
    out_dir.mkdir(parents=True)
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:  # threads only wait on ffmpeg processes
        planned = sum(pool.map(lambda p: ffmpeg_one(p, out_dir, frames, size), corpus))
    seconds = time.perf_counter() - started
    clips = len(list(out_dir.glob("*.webm")))  # count what ffmpeg really wrote
    if clips != planned:
        print(f"warning: ffmpeg wrote {clips} clips, {planned} planned", file=sys.stderr)
    return clips, seconds


def run_lvmae(
    corpus_dir: Path, out: Path, frames: int, size: int, workers: int, per_shard: int
) -> tuple[int, float]:
    cfg = IngestConfig(clip=ClipSpec(num_frames=frames, size=size), shard_clips=per_shard, workers=workers)
    started = time.perf_counter()
    summary = ingest_clips([str(corpus_dir)], str(out), cfg, progress=False)
    return summary.num_samples, time.perf_counter() - started


def run_tokens(dataset: Path, frames: int, size: int) -> dict:
    from ingest.tokens import ingest_tokens
    from lvmae.config import VideoSpec
    from lvmae.tokenizer import Tokenizer, save_tokenizer
    from lvmae.tokenizer_config import TokenizerConfig

    tok = Tokenizer(TokenizerConfig(video=VideoSpec(num_frames=frames, img_size=size), base_channels=16))
    save_tokenizer(tok, dataset / "_bench_tokenizer")
    started = time.perf_counter()
    summary = ingest_tokens(str(dataset), str(dataset / "_bench_tokenizer"), progress=False)
    seconds = time.perf_counter() - started
    clips = getattr(summary, "clips", None) or getattr(summary, "tokenized", None) or 0
    return {
        "clips": clips,
        "seconds": round(seconds, 2),
        "clips_per_s": round(clips / seconds, 2) if clips else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-clips", type=int, default=4)
    parser.add_argument("--tokens", action="store_true", help="also time lvmae ingest tokens")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if shutil.which("ffmpeg") is None:
        sys.exit("ffmpeg not found: apt-get install ffmpeg (Debian's build is the reference here)")
    version = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, check=True).stdout.split(
        "\n"
    )[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lvmae-bench-") as tmp:
        corpus_dir = Path(tmp) / "corpus"
        corpus_dir.mkdir()
        corpus = build_corpus(corpus_dir, args.copies)
        frames_in = sum(probe(str(p), str(p)).frames for p in corpus)
        for w in args.workers:
            n_ours, t_ours = run_lvmae(
                corpus_dir, Path(tmp) / f"lvmae-{w}", args.frames, args.size, w, args.shard_clips
            )
            n_ff, t_ff = run_ffmpeg(corpus, Path(tmp) / f"ffmpeg-{w}", args.frames, args.size, w)
            row = {
                "workers": w,
                "lvmae_clips": n_ours,
                "lvmae_s": round(t_ours, 2),
                "lvmae_clips_per_s": round(n_ours / t_ours, 2),
                "ffmpeg_clips": n_ff,
                "ffmpeg_s": round(t_ff, 2),
                "ffmpeg_clips_per_s": round(n_ff / t_ff, 2),
                "ratio": round((n_ours / t_ours) / (n_ff / t_ff), 3),
            }
            rows.append(row)
            print(json.dumps(row))
        tokens = (
            run_tokens(Path(tmp) / f"lvmae-{args.workers[0]}", args.frames, args.size)
            if args.tokens
            else None
        )
    result = {
        "machine": {
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "ffmpeg": version,
            "loadavg": os.getloadavg(),
        },
        "corpus": {
            "videos": len(corpus),
            "source_frames": frames_in,
            "frames": args.frames,
            "size": args.size,
        },
        "rows": rows,
        "tokens": tokens,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ingest_cpu.json"
    path.write_text(json.dumps(result, indent=2))
    print("| workers | lvmae clips/s | ffmpeg CLI clips/s | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['lvmae_clips_per_s']} | {r['ffmpeg_clips_per_s']} | {r['ratio']} |")
    if tokens:
        print(f"ingest tokens: {tokens}")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
