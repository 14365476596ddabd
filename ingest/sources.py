"""Turning SRC arguments into a sorted list of source videos (and the files passed over, with why).

A SRC is a local directory (searched recursively), a glob, a file, an s3:// (or other fsspec) prefix or
glob, or a manifest: a .csv / .jsonl file with a `path` column (or `uri` / `url`) and optional `label`,
`split`, segment (`start`/`end` in seconds, or `start_frame`/`end_frame`) and other metadata columns.
Paths in a manifest are relative to the manifest's own location; many rows may name one file.

A directory scan takes every file with a video extension, and asks libav about every other file: what
it opens as a moving picture is a source too; the rest (still images, audio, text, ...) is passed over
and counted by reason (Scan.passed_over), so nothing in a corpus goes unaccounted for.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ingest.clip_plan import Segment

VIDEO_EXTENSIONS = {
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".m2v", ".ts", ".m2ts", ".mts",
    ".flv", ".wmv", ".asf", ".3gp", ".3g2", ".ogv", ".ogg", ".gif", ".webp", ".mxf", ".vob", ".dv", ".y4m",
    ".h264", ".264", ".hevc", ".265", ".ivf", ".divx", ".rm", ".rmvb", ".nut",
}  # fmt: skip
# Passed over without asking libav: what a corpus folder holds besides videos (manifests, notes, captions)
OTHER_EXTENSIONS = {
    ".txt", ".md", ".json", ".jsonl", ".csv", ".tsv", ".xml", ".yaml", ".yml", ".srt", ".vtt", ".ass",
    ".pdf", ".html", ".py", ".sh", ".zip", ".tar", ".gz", ".pkl", ".npy", ".npz", ".db", ".log",
}  # fmt: skip
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".manifest.json")
PATH_COLUMNS = ("path", "uri", "url")
SEGMENT_COLUMNS = {"start": "s", "end": "s", "start_frame": "frame", "end_frame": "frame"}


class SourceError(Exception):
    """A SRC argument that names nothing usable (missing path, bad manifest): a user error."""


@dataclass(frozen=True)
class Source:
    uri: str
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    segment: Segment | None = None  # a manifest row's window of the file

    def sort_key(self) -> tuple:
        seg = self.segment
        if seg is None:
            return (self.uri, 0, "", 0.0, 0.0)
        return (self.uri, 1, seg.unit, seg.start or 0.0, math.inf if seg.end is None else seg.end)


@dataclass
class Scan:
    """What the SRC arguments name: the sources (sorted) and the files passed over: {"source", "reason"}."""

    sources: list[Source]
    passed_over: list[dict[str, str]] = field(default_factory=list)

    def passed_over_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.passed_over:
            counts[p["reason"]] = counts.get(p["reason"], 0) + 1
        return dict(sorted(counts.items()))


def _has_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def _is_video(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _manifest_rows(text: str, name: str) -> list[dict[str, Any]]:
    if name.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SourceError(f"{name}:{n}: not JSON ({err.msg})") from None
    return rows


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> list[Source]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise SourceError(f"manifest {url} does not exist") from None
    base = posixpath.dirname(path)
    out = []
    for n, row in enumerate(_manifest_rows(text, url), 1):
        column = next((c for c in PATH_COLUMNS if row.get(c)), None)
        if column is None:
            raise SourceError(f"{url}: row {n} has no {' / '.join(PATH_COLUMNS)} column")
        ref = str(row[column])
        if "://" not in ref and not posixpath.isabs(ref):
            ref = _full_uri(fs, posixpath.normpath(posixpath.join(base, ref)))
        label = row.get("label")
        segment = _segment(row, f"{url}: row {n}")
        meta = {k: v for k, v in row.items() if k not in (column, "label", *SEGMENT_COLUMNS)}
        out.append(Source(ref, None if label in (None, "") else str(label), meta, segment))
    return out


def _segment(row: dict[str, Any], where: str) -> Segment | None:
    """A row's window: start/end (seconds) or start_frame/end_frame, either end open; None: the whole file."""
    given = {k: row.get(k) for k in SEGMENT_COLUMNS if row.get(k) not in (None, "")}
    if not given:
        return None
    units = {SEGMENT_COLUMNS[k] for k in given}
    if len(units) > 1:
        raise SourceError(f"{where}: give start/end (seconds) or start_frame/end_frame, not both")
    unit = units.pop()
    names = ("start", "end") if unit == "s" else ("start_frame", "end_frame")
    try:
        lo, hi = (None if given.get(k) is None else float(given[k]) for k in names)
    except ValueError:
        raise SourceError(f"{where}: {names[0]}/{names[1]} must be numbers, got {given}") from None
    if (lo is not None and lo < 0) or (lo is not None and hi is not None and hi <= lo):
        raise SourceError(f"{where}: the segment [{lo}, {hi}) is empty or negative")
    return Segment(lo, hi, unit)


def expand_sources(srcs: list[str], storage_options: dict[str, Any] | None = None) -> list[Source]:
    """The sources named by `srcs` (scan_sources(...).sources)."""
    return scan_sources(srcs, storage_options).sources


def scan_sources(srcs: list[str], storage_options: dict[str, Any] | None = None) -> Scan:
    """All sources named by `srcs`, de-duplicated and sorted by URI, then segment (the corpus order),
    and the files a directory scan passed over, with why.

    A file both found by a scan and named in a manifest takes the manifest's rows (label, metadata,
    segments) instead of the scan's whole-file source.
    """
    from ingest.probe import sniff

    listed: dict[tuple, Source] = {}  # from manifests, by (uri, segment)
    found: dict[str, Source] = {}  # from scans, globs and files, by uri
    passed_over: dict[str, str] = {}
    for src in srcs:
        if src.endswith(MANIFEST_EXTENSIONS):
            for s in read_manifest(src, storage_options):
                listed[(s.uri, s.segment)] = s
            continue
        fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
        if _has_glob(path):
            matches = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            matches = []
            for p in fs.find(path):
                ext = posixpath.splitext(p)[1].lower()
                why = None if ext in VIDEO_EXTENSIONS else "other-file" if ext in OTHER_EXTENSIONS else None
                if why is None and ext not in VIDEO_EXTENSIONS:
                    why = sniff(fs, p)  # what libav makes of a file of any other extension
                if why is None:
                    matches.append(p)
                else:
                    passed_over[_full_uri(fs, p)] = why
        elif fs.isfile(path):
            matches = [path]  # named explicitly: probed whatever its extension, so bad files get reported
        else:
            raise SourceError(f"{src}: no such file or directory")
        if not matches:
            raise SourceError(f"{src}: matches no video files")
        for p in matches:
            uri = _full_uri(fs, p)
            found.setdefault(uri, Source(uri))
    named = {uri for uri, _ in listed}
    sources = list(listed.values()) + [s for uri, s in found.items() if uri not in named]
    return Scan(
        sorted(sources, key=Source.sort_key),
        [
            {"source": u, "reason": r}
            for u, r in sorted(passed_over.items())
            if u not in named and u not in found
        ],
    )
