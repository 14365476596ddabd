"""Turning SRC arguments into a sorted list of source videos.

A SRC is a local directory (searched recursively), a glob, a file, an s3:// (or other fsspec) prefix or
glob, or a manifest: a .csv / .jsonl file with a `path` column (or `uri` / `url`) and optional `label` and
other metadata columns. Paths in a manifest are relative to the manifest's own location.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec

VIDEO_EXTENSIONS = {
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp", ".ogv",
}  # fmt: skip
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".manifest.json")
PATH_COLUMNS = ("path", "uri", "url")


class SourceError(Exception):
    """A SRC argument that names nothing usable (missing path, bad manifest): a user error."""


@dataclass(frozen=True)
class Source:
    uri: str
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


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
        meta = {k: v for k, v in row.items() if k not in (column, "label")}
        out.append(Source(ref, None if label in (None, "") else str(label), meta))
    return out


def expand_sources(srcs: list[str], storage_options: dict[str, Any] | None = None) -> list[Source]:
    """All sources named by `srcs`, de-duplicated by URI and sorted by URI (the corpus order).

    A file both found by a scan and listed in a manifest keeps the manifest's label and metadata.
    """
    found: dict[str, Source] = {}
    for src in srcs:
        if src.endswith(MANIFEST_EXTENSIONS):
            for s in read_manifest(src, storage_options):
                found[s.uri] = s
            continue
        fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
        if _has_glob(path):
            matches = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            matches = [p for p in fs.find(path) if _is_video(p)]
        elif fs.isfile(path):
            matches = [path]  # named explicitly: probed whatever its extension, so bad files get reported
        else:
            raise SourceError(f"{src}: no such file or directory")
        if not matches:
            raise SourceError(f"{src}: matches no video files")
        for p in matches:
            uri = _full_uri(fs, p)
            if uri not in found:
                found[uri] = Source(uri)
    return [found[k] for k in sorted(found)]
