"""Loader throughput: ClipLoader clips per second (128 x 224 x 224) from local shards and from S3.

In one run, on one fixed data set of VP9 clip shards (built once with `ingest_clips` from the four real
sample videos, cached under --work):

  raw       the limit: the clips' bytes already in memory, decoded by DaliClipDecoder (CPU; float as the
            loader returns it, and uint8) and by PyAV (ingest.clip_decode.decode_clip per clip, uint8, one
            core; PyAVClipDecoder for float, with its conversion thread and with num_threads=1). No I/O,
            no tar parsing.
  loader    train.loader.ClipLoader (decoder "dali" and "pyav"), from the local shards and from a
            SeaweedFS S3 server on loopback (ingest.objectstore.LocalS3Server) holding the same data set.
  wds       what users write by hand: webdataset.WebDataset(shard paths) -> PyAV decode in a torch
            DataLoader with 2 worker processes, converting to float in the workers, or shipping uint8
            and converting in the main process.

Every row gets one warm-up batch that is not timed (DALI pipeline build, worker start-up, the shuffle
buffer's first fill), then is timed over --passes passes over the data set. Each row is run --repeats
times, interleaved with the others, and reported as the median of its quiet runs (below). Clips per
second, frames per second and the ratios to the raw DALI float decode (the limit) and to PyAV's own
uint8 decode (raw-pyav-uint8) go to a markdown table on stdout and to bench/results/loader_cpu[_TAG].json
with the machine's details. Benchmarks never assert timings.

On a shared machine the figures move with other work: before each row the script waits (up to
--wait-quiet seconds) for the cores to be free, and for every timed span it records the CPU seconds that
other processes took (/proc/stat minus this process tree) and the hypervisor's steal time. A run is
quiet when those two are below --quiet-share of the cores; a row's figure is the median of its quiet
runs, rows with none are re-run (--extra-rounds), and a row that never got a quiet run is reported from
all its runs and flagged 0/N.

    .venv/bin/python bench/loader_throughput.py [--work DIR] [--copies 1] [--clip-stride 1]
        [--batch-size 4] [--passes 1] [--repeats 2] [--wait-quiet 60] [--quiet-share 0.1]
        [--extra-rounds 2] [--extra-wait 300] [--skip-s3] [--skip-wds] [--rows REGEX] [--tag TAG]
        [--out bench/results]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from ingest.clip_decode import decode_clip, to_model_input
from ingest.clips import IngestError, ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.samples import sample_videos, tar_samples
from train.loader import ClipLoader

BUCKET = "lvmae-bench"


# ---------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busiest_processes(n: int = 5) -> list[str]:
    """Other processes by %CPU over their lifetime (ps's pcpu), as "pcpu name": names only, since
    command lines can hold secrets. This process is left out."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid=,pcpu=,comm=", "--sort=-pcpu"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [f"{pcpu} {name}" for pid, pcpu, name in rows if int(pid) != os.getpid()][:n]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_snapshot() -> dict[str, float] | None:
    """CPU seconds so far: the machine's busy and stolen time (/proc/stat), and this process tree's own
    (itself, its reaped children, and its live descendants: DataLoader workers, the S3 server). Their
    difference over a row is what other work took from the cores meanwhile. None off Linux."""
    import resource

    tick = os.sysconf("SC_CLK_TCK")
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = [
                int(x) for x in f.readline().split()[1:9]
            ]
        parent, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            parent[int(entry)], cpu[int(entry)] = int(fields[1]), int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None
    tree, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        children = [p for p, pp in parent.items() if pp == pid and p not in tree]
        tree.update(children)
        todo += children
    me, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = me.ru_utime + me.ru_stime + reaped.ru_utime + reaped.ru_stime + sum(cpu[p] for p in tree) / tick
    return {"busy": (user + nice + system + irq + softirq) / tick, "steal": steal / tick, "ours": ours}


def cpu_use(before: dict[str, float] | None, after: dict[str, float] | None, seconds: float) -> dict | None:
    """CPU seconds over a timed span: ours, other work's, stolen by the hypervisor; and as shares of
    all the cores' time (1.0: every core busy the whole span)."""
    if before is None or after is None or seconds <= 0:
        return None
    ours, busy = after["ours"] - before["ours"], after["busy"] - before["busy"]
    steal, capacity = after["steal"] - before["steal"], seconds * (os.cpu_count() or 1)
    return {
        "ours_s": round(ours, 2),
        "others_s": round(busy - ours, 2),
        "steal_s": round(steal, 2),
        "ours_share": round(ours / capacity, 3),
        "others_share": round((busy - ours) / capacity, 3),
        "steal_share": round(steal / capacity, 3),
    }


def wait_quiet(limit_s: float, share: float = 0.1, probe_s: float = 2.0) -> dict[str, float] | None:
    """Wait (up to limit_s) until other work and steal take less than `share` of the cores over a probe.
    -> {"waited_s", "others_share"} as of the last probe; None when not asked to wait."""
    if limit_s <= 0:
        return None
    started = time.perf_counter()
    while True:
        before = cpu_snapshot()
        time.sleep(probe_s)
        use = cpu_use(before, cpu_snapshot(), probe_s)
        others = use["others_share"] + use["steal_share"] if use else 0.0
        waited = time.perf_counter() - started
        if others < share or waited >= limit_s:
            return {"waited_s": round(waited, 1), "others_share": others}


def versions() -> dict[str, str]:
    import av
    import fsspec
    import nvidia.dali
    import s3fs
    import webdataset

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nvidia-dali": nvidia.dali.__version__,
        "av": av.__version__,
        "libavcodec (PyAV)": ".".join(str(v) for v in av.library_versions.get("libavcodec", ())),
        "webdataset": getattr(webdataset, "__version__", "?"),
        "s3fs": s3fs.__version__,
        "fsspec": fsspec.__version__,
        "numpy": np.__version__,
    }
    try:
        from ingest.objectstore import find_weed

        line = subprocess.run([find_weed(), "version"], capture_output=True, text=True, timeout=30).stdout
        found["seaweedfs"] = line.splitlines()[0].strip() if line else "?"
    except Exception as err:  # the S3 rows will say what is wrong; the version is information only
        found["seaweedfs"] = f"unavailable ({type(err).__name__})"
    return found


def code_version() -> dict[str, Any]:
    """The commit, and the files of the measured code that differ from it (read-only git calls)."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "train", "ingest"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}
    return {"commit": commit.stdout.strip(), "modified": status.stdout.split("\n")[:-1]}


def machine() -> dict[str, Any]:
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        # settings that move the PyAV rows (glibc's heap trimming changes decode_clip by 20-30%)
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "GLIBC_TUNABLES"))},
        "versions": versions(),
        "code": code_version(),
    }


# ----------------------------------------------------------------------------------------------- corpus


def build_dataset(work: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The clip data set under work/dataset-<settings>, ingested once from work/corpus-c<copies>
    (ingest_clips resumes: a cached one costs a probe). -> (its directory, its index.json, what ingest
    did)."""
    corpus = work / f"corpus-c{args.copies}"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(args.copies):
        for name, src in sample_videos().items():
            dst = corpus / f"{name}-{i}.mp4"
            if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                shutil.copy(src, dst)
    spec = ClipSpec(num_frames=args.frames, size=args.size, clip_stride=args.clip_stride, codec="vp9")
    cfg = IngestConfig(clip=spec, shard_clips=args.shard_clips, workers=args.ingest_workers)
    out = (
        work / f"dataset-f{args.frames}-s{args.size}-c{args.copies}-st{args.clip_stride}-sh{args.shard_clips}"
    )
    started = time.perf_counter()
    try:
        summary = ingest_clips([str(corpus)], str(out), cfg, progress=False)
    except IngestError:  # a stale cache from another corpus or plan: build it again
        if not out.exists():
            raise
        print(f"rebuilding {out}: it holds a different data set", flush=True)
        shutil.rmtree(out)
        summary = ingest_clips([str(corpus)], str(out), cfg, progress=False)
    seconds = time.perf_counter() - started
    index = json.loads((out / "index.json").read_text())
    info = {
        "path": str(out),
        "sources": summary.sources,
        "clips": index["num_samples"],
        "shards": len(index["shards"]),
        "bytes": sum(s["bytes"] for s in index["shards"]),
        "clip_spec": index["clip_spec"],
        "shard_clips": args.shard_clips,
        "copies": args.copies,
        "ingest_seconds": round(seconds, 2),
        "ingest_cached": summary.shards_skipped == summary.shards,
        "ingest_clips_per_s": None
        if summary.shards_skipped
        else round(summary.samples_written / max(seconds, 1e-9), 2),
    }
    return out, index, info


def clip_bytes(dataset: Path, index: dict[str, Any]) -> list[bytes]:
    """Every clip's encoded bytes, in index order (what the raw rows decode from memory)."""
    ext = index["clip_spec"].get("extension", "webm")
    clips = []
    for shard in index["shards"]:
        with open(dataset / shard["name"], "rb") as f:
            clips += [parts[ext] for _, parts in tar_samples(f) if ext in parts]
    return clips


def upload(server: Any, dataset: Path, index: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Put the data set (every shard and index.json) into a fresh bucket. -> (s3 url, what it cost)."""
    fs = server.filesystem()
    server.create_bucket(BUCKET)
    prefix = f"{BUCKET}/dataset"
    names = [s["name"] for s in index["shards"]] + ["index.json"]  # index.json last, as ingest writes it
    started = time.perf_counter()
    total = 0
    for name in names:
        fs.put_file(str(dataset / name), f"{prefix}/{name}")
        total += (dataset / name).stat().st_size
    seconds = time.perf_counter() - started
    info = {
        "objects": len(names),
        "bytes": total,
        "seconds": round(seconds, 2),
        "MiB_per_s": round(total / 2**20 / max(seconds, 1e-9), 1),
    }
    return f"s3://{prefix}", info


# ----------------------------------------------------------------------------------------------- timing


def batch_info(batch: Any) -> tuple[int, str]:
    """(clips in the batch, 'shape dtype' of its tensor)."""
    if isinstance(batch, dict):
        batch = batch["video"]
    if isinstance(batch, torch.Tensor):
        return batch.shape[0], f"{tuple(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    return int(batch), "per-clip arrays"


def measure(make: Callable[[], Iterable[Any]], frames: int) -> dict[str, Any]:
    """Iterate one row's batches: the first (warm-up: construction, DALI build, worker start-up, the
    shuffle buffer's first fill) is timed apart; the rest are the figure."""
    load_before = loadavg()
    started = time.perf_counter()
    it = iter(make())
    first = next(it)
    first_s = time.perf_counter() - started
    _, shape = batch_info(first)
    del first
    cpu_before = cpu_snapshot()
    clips, batches, t0 = 0, 0, time.perf_counter()
    for batch in it:
        clips += batch_info(batch)[0]
        batches += 1
        del batch
    seconds = time.perf_counter() - t0
    cpu = cpu_use(cpu_before, cpu_snapshot(), seconds)
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return {
        "first_batch_s": round(first_s, 3),
        "batches": batches,
        "clips": clips,
        "seconds": round(seconds, 3),
        "clips_per_s": round(clips / seconds, 2) if seconds > 0 else None,
        "frames_per_s": round(clips * frames / seconds, 1) if seconds > 0 else None,
        "batch": shape,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cpu": cpu,
    }


def chunks(items: list[bytes], size: int, passes: int) -> Iterator[list[bytes]]:
    """One warm-up batch, then `passes` passes over `items` in full batches."""
    yield items[:size]
    for _ in range(passes):
        for i in range(0, len(items) - size + 1, size):
            yield items[i : i + size]


# --------------------------------------------------------------------------------------------- raw rows


def raw_dali(clips: list[bytes], args: argparse.Namespace, uint8: bool) -> Iterator[torch.Tensor]:
    from train.decoders import DaliClipDecoder

    decoder = DaliClipDecoder(args.frames, args.size, args.batch_size, device="cpu", uint8=uint8)
    for batch in chunks(clips, args.batch_size, args.passes):
        out, bad = decoder.decode(batch)
        if bad:
            raise RuntimeError(f"DALI could not decode clips {bad} of a batch")
        yield out


def raw_pyav_uint8(clips: list[bytes], args: argparse.Namespace) -> Iterator[int]:
    for batch in chunks(clips, args.batch_size, args.passes):
        for data in batch:
            decode_clip(data, args.frames)  # (T, H, W, 3) uint8, one array per clip
        yield len(batch)


def raw_pyav_float(clips: list[bytes], args: argparse.Namespace, threads: int = 2) -> Iterator[torch.Tensor]:
    from train.decoders import PyAVClipDecoder

    decoder = PyAVClipDecoder(args.frames, args.size, batch_size=args.batch_size, num_threads=threads)
    for batch in chunks(clips, args.batch_size, args.passes):
        out, bad = decoder.decode(batch)
        if bad:
            raise RuntimeError(f"PyAV could not decode clips {bad} of a batch")
        yield out


# ------------------------------------------------------------------------------------ hand-written rows


def user_decode(sample: dict[str, Any], to_float: bool, fast_convert: bool) -> torch.Tensor:
    """What a user writes: PyAV over the clip's bytes, frames to RGB, stacked (and, in the float rows,
    made (3, T, H, W) float in [0, 1] right here, in the worker)."""
    import av

    kwargs = {"threads": 1} if fast_convert else {}
    with av.open(io.BytesIO(sample["webm"])) as container:
        frames = [f.to_ndarray(format="rgb24", **kwargs) for f in container.decode(video=0)]
    clip = torch.from_numpy(np.stack(frames))  # (T, H, W, 3) uint8
    if to_float:
        return clip.permute(3, 0, 1, 2).float().div(255.0)
    return clip


def wds_loader(
    urls: list[str], args: argparse.Namespace, to_float: bool, fast_convert: bool, convert_after: bool = True
) -> Iterator[torch.Tensor]:
    import webdataset as wds
    from torch.utils.data import DataLoader

    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=args.seed, empty_check=False)
        .shuffle(args.shuffle_buffer)
        .map(functools.partial(user_decode, to_float=to_float, fast_convert=fast_convert))
        .repeat(args.passes)
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    for batch in loader:
        # uint8 shipped: the main process converts, the way ingest.clip_decode.to_model_input does
        yield to_model_input(batch) if convert_after and not to_float else batch


def clip_loader(
    url: str, args: argparse.Namespace, decoder: str, options: dict | None, uint8: bool = False
) -> Iterator[dict]:
    kwargs: dict[str, Any] = {"device": "cpu"} if decoder == "dali" else {}
    if uint8:
        kwargs["uint8"] = True
    loader = ClipLoader(
        url,
        args.batch_size,
        seed=args.seed,
        decoder=decoder,
        decoder_kwargs=kwargs,
        storage_options=options,
        epochs=args.passes,
        shuffle_buffer=args.shuffle_buffer,
    )
    yield from loader
    stats = {k: round(v, 3) for k, v in loader.stats.items()}
    clip_loader.stats[(url, decoder, uint8)] = stats  # type: ignore[attr-defined]


clip_loader.stats = {}  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------- main


def rows_to_run(
    args: argparse.Namespace,
    clips: list[bytes],
    dataset: Path,
    index: dict,
    s3_url: str | None,
    options: dict,
) -> list[dict[str, Any]]:
    """Each row: its settings and a factory for its batches."""
    local = str(dataset)
    urls = [str(dataset / s["name"]) for s in index["shards"]]
    rows: list[dict[str, Any]] = [
        {"name": "raw-dali-float", "kind": "raw decode (limit)", "source": "memory", "decoder": "dali",
         "output": "float32 (B,3,T,H,W)", "make": lambda: raw_dali(clips, args, uint8=False)},
        {"name": "raw-dali-uint8", "kind": "raw decode (limit)", "source": "memory", "decoder": "dali",
         "output": "uint8 (B,T,H,W,3)", "make": lambda: raw_dali(clips, args, uint8=True)},
        {"name": "raw-pyav-float", "kind": "raw decode (limit)", "source": "memory", "decoder": "pyav",
         "output": "float32 (B,3,T,H,W)", "make": lambda: raw_pyav_float(clips, args)},
        {"name": "raw-pyav-float-1thread", "kind": "raw decode", "source": "memory",
         "decoder": "pyav (num_threads=1: converts inline)", "output": "float32 (B,3,T,H,W)",
         "make": lambda: raw_pyav_float(clips, args, threads=1)},
        {"name": "raw-pyav-uint8", "kind": "raw decode (limit)", "source": "memory", "decoder": "pyav",
         "output": "uint8 (T,H,W,3) per clip", "make": lambda: raw_pyav_uint8(clips, args)},
    ]  # fmt: skip
    sources = [("local", local, None)] + ([("s3", s3_url, options)] if s3_url else [])
    for where, url, opts in sources:
        variants = [("dali", False), ("pyav", False)]  # (decoder, uint8)
        if where == "local":
            variants.insert(1, ("dali", True))
        for dec, uint8 in variants:
            rows.append(
                {
                    "name": f"loader-{where}-{dec}" + ("-uint8" if uint8 else ""),
                    "kind": "ClipLoader",
                    "source": f"{where} shards",
                    "decoder": dec,
                    "output": "uint8 (B,T,H,W,3)" if uint8 else "float32 (B,3,T,H,W)",
                    "limit": f"raw-{dec}-uint8" if uint8 else f"raw-{dec}-float",
                    "make": functools.partial(clip_loader, url, args, dec, opts, uint8),
                    "stats_key": (url, dec, uint8),
                }
            )
    if not args.skip_wds:
        hand = f"webdataset + DataLoader({args.workers} workers)"
        rows += [
            {"name": "wds-pyav-float-in-workers", "kind": hand, "source": "local shards", "decoder": "pyav",
             "output": "float32 (B,3,T,H,W), converted in the workers",
             "make": lambda: wds_loader(urls, args, to_float=True, fast_convert=True)},
            {"name": "wds-pyav-uint8-then-float", "kind": hand, "source": "local shards", "decoder": "pyav",
             "output": "uint8 shipped, float32 (B,3,T,H,W) in the main process",
             "make": lambda: wds_loader(urls, args, to_float=False, fast_convert=True)},
            {"name": "wds-pyav-default-convert-uint8-then-float", "kind": hand, "source": "local shards",
             "decoder": "pyav (to_ndarray defaults)",
             "output": "uint8 shipped, float32 (B,3,T,H,W) in the main process",
             "make": lambda: wds_loader(urls, args, to_float=False, fast_convert=False)},
            {"name": "wds-pyav-uint8", "kind": hand, "source": "local shards", "decoder": "pyav",
             "output": "uint8 (B,T,H,W,3), not converted (to be converted on a GPU)",
             "make": lambda: wds_loader(urls, args, to_float=False, fast_convert=True, convert_after=False)},
        ]  # fmt: skip
    if args.rows:
        rows = [row for row in rows if re.search(args.rows, row["name"])]
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="/tmp/lvmae-bench-loader", help="corpus, data set, S3 data dir")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--copies", type=int, default=1, help="copies of the sample videos in the corpus")
    parser.add_argument("--clip-stride", type=int, default=1, help="clip frames between clip starts")
    parser.add_argument("--shard-clips", type=int, default=8)
    parser.add_argument("--ingest-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shuffle-buffer", type=int, default=64, help="ClipLoader's default")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the wds rows")
    parser.add_argument("--passes", type=int, default=1, help="timed passes over the data set per row")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of every row; the median of its quiet runs is reported"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each row, wait up to this many seconds for other work to leave the cores (0: never)",
    )
    parser.add_argument(
        "--quiet-share",
        type=float,
        default=0.1,
        help="a run is quiet when other work and steal took less than this share of the cores",
    )
    parser.add_argument(
        "--extra-rounds", type=int, default=2, help="re-runs of rows that have no quiet run yet"
    )
    parser.add_argument(
        "--extra-wait", type=float, default=300.0, help="--wait-quiet for the re-runs of --extra-rounds"
    )
    parser.add_argument("--skip-s3", action="store_true", help="no S3 server, no S3 rows")
    parser.add_argument("--skip-wds", action="store_true", help="no hand-written webdataset rows")
    parser.add_argument("--rows", default=None, help="only the rows whose name matches this regex")
    parser.add_argument("--tag", default="", help="results go to loader_cpu_TAG.json (a partial run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser.parse_args()


def others_share(run: dict[str, Any]) -> float:
    """The share of the cores other work, or the hypervisor (steal), took during a run's timed span
    (0 where it is unknown)."""
    cpu = run.get("cpu") or {}
    return round(cpu.get("others_share", 0.0) + cpu.get("steal_share", 0.0), 3)


def is_quiet(run: dict[str, Any], args: argparse.Namespace) -> bool:
    return bool(run["clips_per_s"]) and others_share(run) < args.quiet_share


def summarize(row: dict[str, Any], runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The row's figure: the median over its quiet runs (other work below --quiet-share of the cores), or
    over all its runs, flagged, when none was quiet."""
    quiet = [r for r in runs if is_quiet(r, args)]
    used = quiet or [r for r in runs if r["clips_per_s"]]
    median = statistics.median(r["clips_per_s"] for r in used) if used else None
    settings = {k: v for k, v in row.items() if k not in ("make", "stats_key")}
    return {
        **settings,
        "clips_per_s": round(median, 2) if median else None,
        "frames_per_s": None if median is None else round(median * runs[0]["frames"], 1),
        "figure_from": f"median of {len(used)} quiet run(s)"
        if quiet
        else f"median of all {len(used)} runs: none quiet",
        "quiet_runs": len(quiet),
        "clips_per_s_runs": [r["clips_per_s"] for r in runs],
        "others_share_runs": [others_share(r) for r in runs],
        "others_share_max": max((others_share(r) for r in used), default=0.0),
        "first_batch_s_median": round(statistics.median(r["first_batch_s"] for r in used), 3)
        if used
        else None,
        "runs": [{k: v for k, v in r.items() if k != "frames"} for r in runs],
    }


def table(rows: list[dict[str, Any]], limit: float | None, pyav_uint8: float | None) -> str:
    lines = [
        "| row | source | decoder | output | clips/s | frames/s | x DALI float limit | x PyAV uint8 decode "
        "| first batch (s) | quiet runs | others + steal (max) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['clips_per_s'] / limit:.2f}" if limit and r["clips_per_s"] else "-"
        pyav = f"{r['clips_per_s'] / pyav_uint8:.2f}" if pyav_uint8 and r["clips_per_s"] else "-"
        lines.append(
            f"| {r['name']} | {r['source']} | {r['decoder']} | {r['output']} | {r['clips_per_s']} | "
            f"{r['frames_per_s']} | {ratio} | {pyav} | {r['first_batch_s_median']} | "
            f"{r['quiet_runs']}/{len(r['runs'])} | {r['others_share_max']:.0%} |"
        )
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["loadavg_start"] = loadavg()
    info["busiest_processes_start"] = busiest_processes()
    print(f"load average at start: {info['loadavg_start']} on {info['cpus']} CPUs", flush=True)
    started = time.perf_counter()

    dataset, index, corpus = build_dataset(work, args)
    print(
        f"data set: {corpus['clips']} clips in {corpus['shards']} shards, {corpus['bytes'] / 2**20:.1f} MiB "
        f"({'cached' if corpus['ingest_cached'] else 'ingested'} in {corpus['ingest_seconds']} s)",
        flush=True,
    )
    clips = clip_bytes(dataset, index)
    if len(clips) < 2 * args.batch_size:
        sys.exit(f"only {len(clips)} clips: lower --clip-stride or raise --copies")

    server, s3_url, s3_info = None, None, None
    try:
        wants_s3 = not args.rows or any(re.search(args.rows, f"loader-s3-{d}") for d in ("dali", "pyav"))
        if not args.skip_s3 and wants_s3:
            from ingest.objectstore import LocalS3Server

            s3_dir = work / "s3"
            shutil.rmtree(s3_dir, ignore_errors=True)  # a fresh server and bucket every run
            server = LocalS3Server(s3_dir)
            server.start()
            s3_url, s3_info = upload(server, dataset, index)
            s3_info["endpoint"] = "loopback SeaweedFS (weed mini)"
            print(f"S3: uploaded {s3_info['bytes'] / 2**20:.1f} MiB in {s3_info['seconds']} s", flush=True)
        options = server.storage_options() if server is not None else {}
        rows = rows_to_run(args, clips, dataset, index, s3_url, options)
        runs: dict[str, list[dict[str, Any]]] = {r["name"]: [] for r in rows}

        def run(row: dict[str, Any], label: str, wait: float) -> None:
            quiet = wait_quiet(wait)
            result = measure(row["make"], args.frames)
            result["quiet_before"] = quiet
            result["round"] = label
            result["frames"] = args.frames
            if "stats_key" in row:
                result["loader_stats"] = clip_loader.stats.pop(row["stats_key"], None)
            runs[row["name"]].append(result)
            print(
                f"[{label}] {row['name']}: {result['clips_per_s']} clips/s ({result['clips']} clips in "
                f"{result['seconds']} s; first batch {result['first_batch_s']} s; load "
                f"{result['loadavg_after'][0]}; other work + steal {others_share(result):.0%} of the cores)",
                flush=True,
            )

        for repeat in range(args.repeats):
            for row in rows:
                run(row, f"{repeat + 1}/{args.repeats}", args.wait_quiet)
        for extra in range(args.extra_rounds):  # rows with no quiet run yet get another chance
            noisy = [row for row in rows if not any(is_quiet(r, args) for r in runs[row["name"]])]
            for row in noisy:
                run(row, f"extra {extra + 1}", args.extra_wait)
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(work / "s3", ignore_errors=True)

    results = [summarize(row, runs[row["name"]], args) for row in rows]
    by_name = {r["name"]: r for r in results}
    limit = by_name["raw-dali-float"]["clips_per_s"] if "raw-dali-float" in by_name else None
    pyav_uint8 = by_name["raw-pyav-uint8"]["clips_per_s"] if "raw-pyav-uint8" in by_name else None
    for r in results:
        r["ratio_to_dali_float_limit"] = (
            round(r["clips_per_s"] / limit, 3) if limit and r["clips_per_s"] else None
        )
        r["ratio_to_pyav_uint8_decode"] = (
            round(r["clips_per_s"] / pyav_uint8, 3) if pyav_uint8 and r["clips_per_s"] else None
        )
        own = by_name[r["limit"]]["clips_per_s"] if r.get("limit") in by_name else None
        r["ratio_to_own_decoder_limit"] = (
            round(r["clips_per_s"] / own, 3) if own and r["clips_per_s"] else None
        )
    info["loadavg_end"] = loadavg()
    info["busiest_processes_end"] = busiest_processes()
    info["seconds_total"] = round(time.perf_counter() - started, 1)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    result = {"machine": info, "settings": settings, "corpus": corpus, "s3": s3_info, "rows": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"loader_cpu_{args.tag}.json" if args.tag else "loader_cpu.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(results, limit, pyav_uint8))
    print(
        f"\n{corpus['clips']} clips of {args.frames}x{args.size}x{args.size}, batch {args.batch_size}, "
        f"{args.passes} pass(es) x {args.repeats} repeat(s), median of quiet runs shown; load average "
        f"{info['loadavg_start']} -> {info['loadavg_end']}; other work and steal took up to "
        f"{max(r['others_share_max'] for r in results):.0%} of the cores during a counted run; "
        f"{info['seconds_total']} s in all"
    )
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
