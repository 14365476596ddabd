"""`lvmae ingest survey`: what a corpus holds and what `ingest clips` would make of it, before the hours
are spent.

survey() scans the SRC arguments as `ingest clips` does (ingest.sources), gives every source its split
(ingest.labels), probes every file once on a thread pool (ingest.clips' own probing), plans every clip
(ingest.clip_plan.clips_of per source row) and, unless told not to, cuts ONE real clip to time it. The
rest are pure functions of those records, each giving one part of the report (a JSON-ready dict):

    sources     rows, files, segments, usable / unusable files, files passed over
    files       counts per usable file: container, codec, pixel format, range, matrix, bit depth,
                HDR transfer, rotation, rate, frame count (header or counted), damage
    histograms  per usable file: duration, frame rate, display short side, orientation
    clips       the plan's clips: total, per split, per label, per split and label, per source row
    skipped     unusable files (by reason), too-short rows (ingest.clips.too_short), files passed over
    estimate    output size and ingest time, and what each rests on

format_report(report) is the printout.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from ingest import labels
from ingest.clip_plan import Clip, VideoInfo, clips_of, estimate_clip_bytes
from ingest.clips import probe_sources, too_short
from ingest.config import ClipSpec, IngestConfig
from ingest.retry import StoreRetry
from ingest.shards import fetch_source, is_remote, sample_metadata
from ingest.sources import scan_sources
from ingest.video import cut_clips

SURVEY_VERSION = 1
INF = math.inf
# Histogram bins: (upper bound, exclusive; label), in order
DURATION_BINS = ((2, "<2 s"), (10, "2-10 s"), (60, "10-60 s"), (600, "1-10 min"), (INF, ">10 min"))
FPS_BINS = ((20, "<20"), (25, "20-24"), (26, "25"), (31, "26-30"), (51, "31-50"), (61, "51-60"), (INF, ">60"))
SHORT_SIDE_BINS = (
    (240, "<240"), (360, "240-359"), (480, "360-479"), (720, "480-719"), (1080, "720-1079"),
    (2160, "1080-2159"), (INF, ">=2160"),
)  # fmt: skip
CLIPS_PER_ROW_BINS = ((1, "0"), (2, "1"), (10, "2-9"), (100, "10-99"), (INF, "100+"))
TAR_SAMPLE_BYTES = 2048  # unmeasured: two tar headers, KEY.json (~700 bytes) and padding, per sample


def _tar_entry(n: int) -> int:
    return 512 + -(-n // 512) * 512  # a header block, then the data padded to whole blocks


def _counts(values) -> dict[str, int]:
    """Occurrences by value, most first (then by name); keys as strings (JSON)."""
    counts = Counter(str(v) for v in values)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def histogram(values, bins) -> dict[str, int]:
    """Every bin's count, in bin order (empty bins too): a value goes in the first bin whose bound
    exceeds it."""
    out = {label: 0 for _, label in bins}
    for v in values:
        out[next(label for bound, label in bins if v < bound)] += 1
    return out


def describe_files(files: list[VideoInfo], size: int) -> dict[str, Any]:
    """The "files", "histograms" and "totals" parts: each usable file once (its first row)."""
    looks = [v.look for v in files]
    shorts = [min(v.display_size) for v in files]
    return {
        "files": {
            "container": _counts(v.container or "unknown" for v in files),
            "codec": _counts(v.codec or "unknown" for v in files),
            "pix_fmt": _counts(k.pix_fmt for k in looks),
            "range": _counts("full" if k.full_range else "limited" for k in looks),
            "matrix": _counts(f"{k.matrix} ({'tagged' if k.matrix_tagged else 'guessed'})" for k in looks),
            "bit_depth": _counts(k.bit_depth for k in looks),
            "transfer": _counts(k.transfer or "sdr" for k in looks),
            "rotation": _counts(k.rotation for k in looks),
            "rate": _counts("variable" if v.variable_rate else "constant" for v in files),
            "frame_count": _counts("counted" if v.frames_counted else "header" for v in files),
            "damage": _counts("truncated" if v.damage else "intact" for v in files),
            "below_clip_size": sum(s < size for s in shorts),  # upscaled to --size
        },
        "histograms": {
            "duration": histogram((v.duration for v in files), DURATION_BINS),
            "fps": histogram((round(v.fps) for v in files), FPS_BINS),
            "short_side": histogram(shorts, SHORT_SIDE_BINS),
            "orientation": _counts(
                "landscape" if w > h else "portrait" if h > w else "square"
                for w, h in (v.display_size for v in files)
            ),
        },
        "totals": {
            "hours": round(sum(v.duration for v in files) / 3600, 4),
            "frames": sum(v.frames for v in files),
        },
        "damaged": [{"source": v.uri, "detail": v.damage} for v in files if v.damage],
    }


def clip_counts(rows: list[VideoInfo], planned: list[list[Clip]]) -> dict[str, Any]:
    """The "clips" part: the plan's clips (planned[i]: source row i's) by split and label (labels.count;
    "" is no label), and how many clips each source row gives."""
    per_split_label = labels.merge_counts(
        [labels.count((c.split, c.label) for clips in planned for c in clips)]
    )
    per_label: Counter[str] = Counter()
    for per in per_split_label.values():
        per_label.update(per)
    return {
        "total": sum(len(c) for c in planned),
        "rows_with_clips": sum(bool(c) for c in planned),
        "rows": len(rows),
        "per_split": {s: sum(per.values()) for s, per in per_split_label.items()},
        "per_label": dict(sorted(per_label.items())),
        "per_split_label": per_split_label,
        "per_row": histogram((len(c) for c in planned), CLIPS_PER_ROW_BINS),
    }


def skipped(errors: list[dict], short: list[dict], passed_over: list[dict]) -> dict[str, Any]:
    """The "skipped" part: unusable files (failed probes), too-short rows and files passed over, with
    counts by reason and every record."""
    return {
        "unusable": {"count": len(errors), "reasons": _counts(e["reason"] for e in errors), "files": errors},
        "too_short": {"count": len(short), "rows": short},
        "passed_over": {
            "count": len(passed_over),
            "reasons": _counts(p["reason"] for p in passed_over),
            "files": passed_over,
        },
    }


def measure_clip(clip: Clip, spec: ClipSpec, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Cut one real clip at the spec and time it (decode from the source's start + scale + encode; a
    remote source's download is not timed).
    -> {source, key, seconds, bytes, sample_bytes, bits_per_pixel}, or {source, error}."""
    with tempfile.TemporaryDirectory(prefix="lvmae-survey-") as tmp:
        try:
            path = fetch_source(clip.uri, storage_options, tmp, StoreRetry())
        except OSError as err:
            return {"source": clip.uri, "error": f"{clip.uri} is unreadable: {err}"}
        started = time.perf_counter()
        ((_, data),) = list(cut_clips(path, [clip], spec.size, spec.codec))
        seconds = time.perf_counter() - started
    if not isinstance(data, bytes):
        return {
            "source": clip.uri,
            "error": f"cutting {clip.key} of {clip.uri} failed: {data.reason}: {data.detail}",
        }
    meta = json.dumps(sample_metadata(clip, spec, data), sort_keys=True).encode()
    return {
        "source": clip.uri,
        "key": clip.key,
        "seconds": round(seconds, 4),
        "bytes": len(data),
        "sample_bytes": _tar_entry(len(data)) + _tar_entry(len(meta)),  # as the shard's tar holds it
        "bits_per_pixel": round(len(data) * 8 / (spec.num_frames * spec.size * spec.size), 4),
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def estimate(
    num_clips: int, spec: ClipSpec, measured: dict[str, Any] | None, workers: int, probe_seconds: float
) -> dict[str, Any]:
    """The "estimate" part: output bytes and ingest seconds, and the basis of each (in words).

    Size: the measured clip's bytes in the tar (clip + KEY.json), else estimate_clip_bytes' 0.2 bits a
    pixel plus ~2 KiB a sample. Time: scanning and probing (as timed here) + clips x the measured seconds
    of one clip / the workers that run at once (--workers, at most the CPUs); none without a measurement."""
    ok = measured is not None and "error" not in measured
    parallel = max(1, min(workers, _cpus()))
    if ok:
        per_clip = measured["sample_bytes"]
        size_basis = (
            f"measured: one {spec.codec} clip of {measured['source']} "
            f"({measured['bits_per_pixel']:.3g} bits a pixel, {measured['bytes']} bytes "
            "+ tar headers and KEY.json)"
        )
    else:
        per_clip = estimate_clip_bytes(spec.num_frames, spec.size) + TAR_SAMPLE_BYTES
        size_basis = "assumed: 0.2 bits a pixel (ingest.clip_plan.estimate_clip_bytes) + ~2 KiB a sample"
    if measured is None:
        time_basis = "not measured (--no-measure)"
    elif not ok:
        time_basis = f"not measured: {measured['error']}"
    else:
        time_basis = (
            f"measured: scanning and probing took {probe_seconds:.2f} s here; one clip of "
            f"{measured['source']} took {measured['seconds']:.3f} s (decode from the source's start, "
            "scale, encode; one process), "
            f"x {num_clips} clips / {parallel} worker{'s' * (parallel != 1)} at once "
            f"(--workers {workers}, {_cpus()} CPUs), assuming they scale linearly"
            + ("; downloading the sources not included" if is_remote(measured["source"]) else "")
        )
    seconds = probe_seconds + num_clips * measured["seconds"] / parallel if ok else None
    return {
        "clips": num_clips,
        "bytes_per_clip": per_clip,
        "output_bytes": num_clips * per_clip,
        "size_basis": size_basis,
        "measured": measured,
        "workers": workers,
        "parallel": parallel,
        "probe_seconds": round(probe_seconds, 3),
        "ingest_seconds": None if seconds is None else round(seconds, 2),
        "time_basis": time_basis,
    }


def survey(
    srcs: list[str],
    spec: ClipSpec,
    workers: int = 1,
    storage_options: dict[str, Any] | None = None,
    measure: bool = True,
    *,
    split_seed: int = 0,
    val_share: float = 0.1,
    test_share: float = 0.1,
    progress: bool = False,
) -> dict[str, Any]:
    """The survey report of a corpus (see the module docstring) as `ingest clips SRCS` with this spec and
    these split settings would see it. Raises SourceError, LabelError, ConfigError as ingest clips does."""
    cfg = IngestConfig(
        clip=spec, workers=workers, split_seed=split_seed, val_share=val_share, test_share=test_share,
        storage_options=dict(storage_options or {}),
    )  # fmt: skip
    cfg.validate()
    started = time.perf_counter()
    scan = scan_sources(srcs, storage_options or None)
    sources = labels.assign_splits(scan.sources, split_seed, val_share, test_share)
    rows, errors = probe_sources(cfg, sources, progress)  # every file probed once, on max(4, workers) threads
    first_rows: dict[str, VideoInfo] = {}
    for v in rows:
        first_rows.setdefault(v.uri, v)
    files = list(first_rows.values())  # each usable file once
    probe_seconds = time.perf_counter() - started
    planned = [clips_of(v, spec.num_frames, spec.fps, spec.frame_stride, spec.stride) for v in rows]
    short = too_short([v for v, c in zip(rows, planned) if not c], spec)
    first = next((c[0] for c in planned if c), None)
    measured = None
    if measure:
        no_clip = {"source": None, "error": "no source gives a clip to cut"}
        measured = no_clip if first is None else measure_clip(first, spec, cfg.storage_options)
    return {
        "survey_version": SURVEY_VERSION,
        "sources": {
            "rows": len(sources),
            "files": len({s.uri for s in sources}),
            "segments": sum(s.segment is not None for s in sources),
            "usable_files": len(files),
            "unusable_files": len(errors),
            "passed_over": len(scan.passed_over),
        },
        "spec": asdict(spec),
        "splits": {"split_seed": split_seed, "val_share": val_share, "test_share": test_share},
        **describe_files(files, spec.size),
        "clips": clip_counts(rows, planned),
        "skipped": skipped(errors, short, scan.passed_over),
        "estimate": estimate(sum(len(c) for c in planned), spec, measured, workers, probe_seconds),
    }


# ---------------------------------------------------------------------------------------------------
# The printout
# ---------------------------------------------------------------------------------------------------

FILE_LINES = (
    ("container", "container"), ("codec", "codec"), ("pix_fmt", "pixel format"), ("range", "range"),
    ("matrix", "matrix"), ("bit_depth", "bit depth"), ("transfer", "HDR transfer"), ("rotation", "rotation"),
    ("rate", "frame rate"), ("frame_count", "frame count"), ("damage", "damage"),
)  # fmt: skip
LISTED = 5  # records printed per kind of skip; the JSON has them all


def _bytes(n: float) -> str:
    exponent = min(4, int(math.log10(n) // 3)) if n >= 1000 else 0
    return f"{n:.0f} B" if exponent == 0 else f"{n / 1000**exponent:.1f} {'kMGT'[exponent - 1]}B"


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _row(name: str, text: str) -> str:
    return f"  {name:<14}{text}"


def _joined(counts: dict[str, int], sep: str = ", ") -> str:
    return sep.join(f"{k or '(no label)'} {n}" for k, n in counts.items()) or "none"


def _listed(records: list[dict], line) -> list[str]:
    out = [" " * 18 + line(r) for r in records[:LISTED]]
    return out + (
        [" " * 18 + f"... and {len(records) - LISTED} more (all in --json)"] if len(records) > LISTED else []
    )


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines `lvmae ingest survey` prints."""
    src, files, hist, clips, skip, est = (
        report[k] for k in ("sources", "files", "histograms", "clips", "skipped", "estimate")
    )
    spec, totals = report["spec"], report["totals"]
    segments = f", {src['segments']} of them segments" if src["segments"] else ""
    lines = [
        f"survey: {src['files']} files ({src['rows']} source rows{segments}): {src['usable_files']} usable, "
        f"{src['unusable_files']} unusable; {src['passed_over']} passed over; "
        f"scanned and probed in {_seconds(est['probe_seconds'])}",
        "",
        "files (each usable file once)",
        *(_row(label, _joined(files[key])) for key, label in FILE_LINES),
        *(_listed(report["damaged"], lambda d: f"{d['source']}: {d['detail']} (its whole clips are kept)")),
        _row("below --size", f"{files['below_clip_size']} (short side under {spec['size']}: upscaled)"),
        _row("duration", _joined(hist["duration"], " | ")),
        _row("", f"total {totals['hours']:.2f} h, {totals['frames']} frames"),
        _row("fps", _joined(hist["fps"], " | ")),
        _row("short side", _joined(hist["short_side"], " | ") + " (px, as displayed)"),
        _row("orientation", _joined(hist["orientation"])),
        "",
        f"clips: {clips['total']} of {spec['num_frames']} frames at {spec['size']}x{spec['size']} "
        f"({spec['codec']}) from {clips['rows_with_clips']} of {clips['rows']} usable source rows",
        _row("per split", _joined(clips["per_split"])),
        _row("per label", _joined(clips["per_label"])),
        _row("per row", _joined(clips["per_row"], " | ") + " (clips a source row gives)"),
        "",
        "skipped",
        _row("unusable", f"{skip['unusable']['count']} files: {_joined(skip['unusable']['reasons'])}"),
        *_listed(skip["unusable"]["files"], lambda e: f"{e['source']}: {e['reason']}: {e['detail']}"),
        _row("too short", f"{skip['too_short']['count']} source rows"),
        *_listed(skip["too_short"]["rows"], lambda e: f"{e['source']}: {e['detail']}"),
        _row(
            "passed over", f"{skip['passed_over']['count']} files: {_joined(skip['passed_over']['reasons'])}"
        ),
        *_listed(skip["passed_over"]["files"], lambda e: f"{e['source']}: {e['reason']}"),
        "",
        "estimate",
        _row(
            "output",
            f"~{_bytes(est['output_bytes'])} ({est['clips']} clips x {_bytes(est['bytes_per_clip'])})",
        ),
        _row("", est["size_basis"]),
        _row(
            "ingest time",
            "not measured" if est["ingest_seconds"] is None else f"~{_seconds(est['ingest_seconds'])}",
        ),
        _row("", est["time_basis"]),
    ]
    return "\n".join(lines)
