"""`lvmae ingest clips`: a video corpus -> WebDataset clip shards + index.json.

Layout under --out:
  shards/shard-NNNNNN.tar    samples KEY.webm (the clip) + KEY.json (its metadata), byte-for-byte
                             deterministic for a given corpus and spec
  shards/shard-NNNNNN.json   the shard's completion record (written after the tar: its commit marker)
  errors.jsonl               every skipped source or clip: {"source", "reason", "detail"}; a source too
                             short for one clip (reason too-short) also gives its frame counts
  index.json                 written LAST, once every shard is recorded: its presence means complete

This module runs an ingest: it probes the sources, plans clips and shards (ingest.clip_plan), skips the
shards already recorded, hands the rest to a runner (in process, a process pool, or Ray through
ingest.ray_executor), and finalizes errors.jsonl and index.json. Each shard's own work (fetching its
sources, cutting, the tar and its record) is ingest.shards.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ingest import labels
from ingest.clip_plan import (
    VideoInfo,
    clips_of,
    coverage,
    estimate_clip_bytes,
    group_into_shards,
    plan_clips,
    plan_digest,
    shards_of_node,
)
from ingest.config import ClipSpec, IngestConfig
from ingest.shards import ShardTask, probe_source, run_shard_in_worker, shard_name, write_shard
from ingest.sources import Source, scan_sources
from ingest.storage import Store
from ingest.video import clip_extension

FORMAT_VERSION = 1


class IngestError(Exception):
    """Ingest cannot go on (nothing usable, a conflicting earlier run, --strict): a user error."""


def _run_on_ray(
    todo: list[ShardTask], address: str | None, workers: int, account: Callable[[dict[str, Any]], None]
) -> None:
    """write_shard for every task on Ray (a local instance of `workers` CPUs when address is None);
    account(record) as each completes."""
    from ingest.ray_executor import ray_session, write_shards

    with ray_session(address, num_cpus=workers) as ray:
        for record in write_shards(ray, todo, write_shard):
            account(record)


@dataclass
class IngestSummary:
    out: str
    sources: int = 0  # source files
    segments: int = 0  # manifest rows that name a window of a file (start/end)
    passed_over: dict[str, int] = field(default_factory=dict)  # files a scan passed over, by reason
    variable_rate: int = 0  # sources whose frame rate varies: sampled by presentation time
    rotated: int = 0  # sources with a display rotation: turned upright
    bad_sources: int = 0  # failed to probe (empty, not a video, unreadable, ...)
    too_short: int = 0  # probed, but too short for one clip: they yield none (errors.jsonl: too-short)
    clips_planned: int = 0
    shards: int = 0
    shards_skipped: int = 0
    samples_written: int = 0
    bytes_written: int = 0
    clip_errors: int = 0
    seconds: float = 0.0
    index_written: bool = False
    num_samples: int = 0  # in the finished data set (all nodes)
    labels: dict[str, Any] = field(default_factory=dict)  # index.json's "labels" (classes, split counts)
    errors: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the skipped sources' records

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("errors")
        return d


def probe_sources(
    cfg: IngestConfig, sources: list[Source], progress: bool
) -> tuple[list[VideoInfo], list[dict]]:
    """Probe every file once (many manifest rows may name one file) -> a VideoInfo per source row (with
    the row's label, metadata and segment), in corpus order, and an error record per unusable file."""
    from tqdm import tqdm

    rows: dict[str, list[Source]] = {}
    for s in sources:
        rows.setdefault(s.uri, []).append(s)
    videos, errors = [], []
    with cf.ThreadPoolExecutor(max(4, cfg.workers)) as pool:
        results = pool.map(lambda uri: probe_source(Source(uri), cfg.storage_options), rows)
        for uri, res in tqdm(
            zip(rows, results), total=len(rows), desc="probe", unit="file", disable=not progress
        ):
            if isinstance(res, VideoInfo):
                videos += [
                    replace(res, label=s.label, meta=dict(s.meta), segment=s.segment) for s in rows[uri]
                ]
            else:
                errors.append(res)
                if cfg.strict:
                    raise IngestError(f"{uri}: {res['reason']}: {res['detail']} (--strict)")
    return videos, errors


def too_short(videos: list[VideoInfo], spec: ClipSpec) -> list[dict[str, Any]]:
    """An errors.jsonl record (reason too-short) for each video (or segment) too short for one clip,
    which yields none.

    Its counts (ingest.clip_plan.coverage): source_frames, the frames probed (in the segment, if any);
    source_frames_needed, the source frames one clip spans at the spec's frame step; sampled_frames, the
    frames the source gives at that step, fewer than clip_frames, the frames of a clip.
    """
    records = []
    for v in videos:
        if clips_of(v, spec.num_frames, spec.fps, spec.frame_stride, spec.stride):
            continue
        c = coverage(v, spec.num_frames, spec.fps, spec.frame_stride)
        sampled = "" if c["step"] == 1 else f"; {c['sampled_frames']} when sampled every {c['step']:.4g}"
        where = "" if v.segment is None else f" in {v.segment.tag()[1:]}"
        record = {
            "source": v.uri,
            "reason": "too-short",
            "detail": f"{c['source_frames']} source frames{where} (as probed{sampled}): a "
            f"{spec.num_frames}-frame clip needs {c['source_frames_needed']}",
            "source_frames": c["source_frames"],
            "source_frames_needed": c["source_frames_needed"],
            "sampled_frames": c["sampled_frames"],
            "clip_frames": spec.num_frames,
        }
        if v.segment is not None:
            record["segment"] = [v.segment.start, v.segment.end, v.segment.unit]
        records.append(record)
    return records


def finalize(
    store: Store,
    cfg: IngestConfig,
    plan: str,
    num_shards: int,
    source_errors: list[dict],
    passed_over: dict[str, int] | None = None,
) -> dict | None:
    """Write errors.jsonl then index.json if every shard of the plan is recorded; -> the index or None.

    source_errors: the records of the sources that yield no clip (failed probes, too short)."""
    records = []
    for k in range(num_shards):
        rel = f"{shard_name(k)}.json"
        if not store.exists(rel):
            return None
        records.append(store.read_json(rel))
    errors = list(source_errors) + [e for r in records for e in r["errors"]]
    store.write_bytes("errors.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    spec = cfg.clip
    counts = labels.merge_counts(r.get("counts", {}) for r in records)
    index = {
        "format_version": FORMAT_VERSION,
        "clip_spec": {**asdict(spec), "extension": clip_extension(spec.codec)},
        "plan": plan,
        "num_samples": sum(r["samples"] for r in records),
        "num_errors": len(errors),
        "passed_over": passed_over or {},
        "labels": labels.index_entry(counts, cfg.split_seed, cfg.val_share, cfg.test_share),
        "shards": [
            {
                "name": r["shard"],
                "samples": r["samples"],
                "bytes": r["bytes"],
                "sha256": r["sha256"],
                "splits": {s: sum(n.values()) for s, n in labels.merge_counts([r.get("counts", {})]).items()},
            }
            for r in records
            if r["samples"] > 0
        ],
    }
    store.write_json("index.json", index)
    return index


def ingest_clips(
    srcs: list[str],
    out: str,
    cfg: IngestConfig,
    progress: bool = True,
    on_progress: Callable[[str, int], None] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> IngestSummary:
    """Run (or resume) an ingest; see the module docstring. on_progress(metric, amount) feeds metrics.

    executor: "local" (this process, or cfg.workers processes) or "ray" (a Ray task per shard, on the
    cluster at ray_address, or on a local Ray of cfg.workers CPUs when it is None; ingest.ray_executor).
    """
    from tqdm import tqdm

    cfg.validate()
    started = time.perf_counter()
    notify = on_progress or (lambda metric, amount: None)
    store = Store(out, cfg.storage_options or None)
    summary = IngestSummary(out=out)
    scan = scan_sources(srcs, cfg.storage_options or None)
    sources = labels.assign_splits(scan.sources, cfg.split_seed, cfg.val_share, cfg.test_share)
    summary.sources = len({s.uri for s in sources})
    summary.segments = sum(s.segment is not None for s in sources)
    summary.passed_over = scan.passed_over_counts()
    videos, probe_errors = probe_sources(cfg, sources, progress)
    summary.variable_rate = len({v.uri for v in videos if v.variable_rate})
    summary.rotated = len({v.uri for v in videos if v.look.rotation})
    summary.bad_sources = len(probe_errors)
    notify("files_ok", len(videos))
    notify("files_bad", len(probe_errors))
    spec = cfg.clip
    clips = plan_clips(videos, spec.num_frames, spec.fps, spec.frame_stride, spec.stride)
    short = too_short(videos, spec)
    damaged = {  # truncated files whose whole clips are kept: reported once per file
        v.uri: {"source": v.uri, "reason": "truncated", "detail": f"{v.damage}; its whole clips are kept"}
        for v in videos
        if v.damage
    }

    summary.too_short = len(short)
    source_errors = sorted(
        probe_errors + short + list(damaged.values()), key=lambda e: e["source"]
    )  # corpus order: by URI
    per_shard = cfg.shard_clips or max(1, cfg.shard_bytes // estimate_clip_bytes(spec.num_frames, spec.size))
    shards = group_into_shards(clips, per_shard)
    plan = plan_digest(shards, {"spec": asdict(spec), "per_shard": per_shard})
    summary.clips_planned, summary.shards = len(clips), len(shards)
    if not clips:
        raise IngestError(_nothing_to_ingest(len(sources), short, probe_errors, spec.num_frames))
    if store.exists("index.json"):
        index = store.read_json("index.json")
        if index.get("plan") != plan:
            raise IngestError(
                f"{out} already holds a different data set (plan {index.get('plan')}, now {plan}); use a new --out"
            )
    if cfg.num_nodes == 1:
        store.remove_stale_temporaries("shards")

    todo = []
    for k in shards_of_node(len(shards), cfg.num_nodes, cfg.node_rank):
        rel = f"{shard_name(k)}.json"
        if store.exists(rel):
            done = store.read_json(rel)
            if done.get("plan") != plan:
                raise IngestError(
                    f"{store.uri(rel)} belongs to a different plan; use a new --out for a changed corpus or spec"
                )
            summary.shards_skipped += 1
            continue
        todo.append(ShardTask(k, shards[k], out, spec, plan, cfg.storage_options))

    bar = tqdm(total=sum(len(t.clips) for t in todo), desc="clips", unit="clip", disable=not progress)
    written = {"bytes": 0}

    def on_clip(n: int, nbytes: int) -> None:
        written["bytes"] += nbytes
        bar.update(n)
        bar.set_postfix(MB=f"{written['bytes'] / 1e6:.1f}", refresh=False)
        notify("clips", n)
        notify("bytes", nbytes)

    def account(record: dict[str, Any], per_clip_done: bool) -> None:
        summary.samples_written += record["samples"]
        summary.bytes_written += record["bytes"]
        summary.clip_errors += len(record["errors"])
        notify("clip_errors", len(record["errors"]))
        if not per_clip_done:
            on_clip(record["samples"], 0)
        bar.update(len(record["errors"]))  # failed clips are done too, as far as progress goes
        if cfg.strict and record["errors"]:
            e = record["errors"][0]
            raise IngestError(f"{e['source']}: {e['reason']}: {e['detail']} (--strict)")

    try:
        if executor == "ray" and todo:
            _run_on_ray(todo, ray_address, cfg.workers, lambda record: account(record, per_clip_done=False))
            if cfg.num_nodes == 1:
                store.remove_stale_temporaries("shards")  # left by a worker killed while writing
        elif cfg.workers == 1 or len(todo) <= 1:
            for task in todo:
                account(write_shard(task, on_clip), per_clip_done=True)
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork: fsspec/s3fs run event-loop threads
            with cf.ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
                for record in pool.map(run_shard_in_worker, todo):
                    account(record, per_clip_done=False)
    finally:
        bar.close()

    index = finalize(store, cfg, plan, len(shards), source_errors, summary.passed_over)
    summary.errors = source_errors
    summary.index_written = index is not None
    summary.num_samples = index["num_samples"] if index else 0
    summary.labels = index["labels"] if index else {}
    summary.seconds = round(time.perf_counter() - started, 2)
    if index is not None and index["num_samples"] == 0:
        raise IngestError(
            f"no clip could be written ({_reasons(source_errors)}); see {store.uri('errors.jsonl')}"
        )
    return summary


def _nothing_to_ingest(num_sources: int, short: list[dict], probe_errors: list[dict], frames: int) -> str:
    """The one line for a corpus that yields no clip: how many sources are too short, how many unusable."""
    parts = []
    if short:
        longest = max(short, key=lambda e: (e["sampled_frames"], e["source_frames"]))
        parts.append(
            f"{len(short)} too short for a {frames}-frame clip (the longest, {longest['source']}, has "
            f"{longest['source_frames']} source frames; it needs {longest['source_frames_needed']})"
        )
    if probe_errors:
        parts.append(f"{len(probe_errors)} unusable ({_reasons(probe_errors)})")
    return f"nothing to ingest: of {num_sources} sources, " + "; ".join(parts or ["none is usable"])


def _reasons(errors: list[dict]) -> str:
    counts: dict[str, int] = {}
    for e in errors:
        counts[e["reason"]] = counts.get(e["reason"], 0) + 1
    return ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
