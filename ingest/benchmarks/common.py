"""What every benchmark converter shares: the rows it makes, reading annotation files strictly (one clear
AnnotationError naming the file and the layout expected), finding videos under ROOT (one recursive scan,
indexed by relative path and by file stem), and writing the manifest and its missing-videos list."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.sources import VIDEO_EXTENSIONS

MISSING_COLUMNS = ("id", "split", "expected", "reason")
_SPLIT_NAMES = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
    "validation": "val", "test": "test", "testing": "test",
}  # fmt: skip


class AnnotationError(Exception):
    """An annotation file that is missing, unreadable or not in its benchmark's published layout."""


@dataclass(frozen=True)
class Options:
    label: str | None = None  # epic-kitchens-100: verb | noun | action
    fold: int | None = None  # ucf101, hmdb51: 1 | 2 | 3


@dataclass
class Row:
    """One manifest row: a video (relative to ROOT), its label and split, an optional segment, metadata."""

    id: str
    split: str
    label: str
    video: str
    start: float | None = None
    end: float | None = None
    start_frame: int | None = None
    end_frame: int | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Converted:
    """A converter's answer: the manifest's columns (a fixed set per format), rows, missing videos, notes."""

    columns: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)
    missing: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def miss(self, id: str, split: str, expected: str) -> None:
        self.missing.append({"id": id, "split": split, "expected": expected, "reason": "not-found"})


@dataclass
class Summary:
    out: Path
    missing_file: Path
    rows: int
    videos: int
    per_split: dict[str, int]
    missing: int
    missing_videos: int
    notes: list[str]

    def line(self) -> str:
        splits = ", ".join(f"{s} {n}" for s, n in self.per_split.items()) or "none"
        notes = "".join(f"; {n}" for n in self.notes)
        return (
            f"manifest: {self.rows} rows, {self.videos} videos (rows per split: {splits}); "
            f"{self.missing} rows whose video is missing ({self.missing_videos} videos) listed in "
            f"{self.missing_file}{notes} -> {self.out}"
        )


# ---------------------------------------------------------------------------------------------- files


def missing_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.missing.csv")


def expand(paths: Iterable[str | os.PathLike[str]], out: Path) -> list[tuple[Path, bool]]:
    """The annotation files named: (path, named explicitly); a directory gives every file under it
    except this run's own output (the manifest and its missing list, when written there)."""
    own = {out.resolve(), missing_path(out).resolve()}
    out_files = []
    for p in map(Path, paths):
        if p.is_dir():
            out_files += [(f, False) for f in sorted(p.rglob("*")) if f.is_file() and f.resolve() not in own]
        elif p.exists():
            out_files.append((p, True))
        else:
            raise AnnotationError(f"{p}: no such annotation file")
    return out_files


def assign(
    files: list[tuple[Path, bool]], roles: Sequence[tuple[str, Callable[[str], bool]]], expected: str
) -> dict[str, list[Path]]:
    """Sort the files into roles by name (lower case; the first matching role wins). A file named
    explicitly that fits no role is an error; one found in a named directory is skipped."""
    out: dict[str, list[Path]] = {role: [] for role, _ in roles}
    for path, explicit in files:
        role = next((r for r, match in roles if match(path.name.lower())), None)
        if role is not None:
            out[role].append(path)
        elif explicit:
            raise AnnotationError(f"{path}: not one of this format's annotation files (expected {expected})")
    return out


def need(found: list[Path], what: str) -> list[Path]:
    if not found:
        raise AnnotationError(f"no {what} among the annotation files")
    return found


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read it ({err})") from None


def read_csv(path: Path, required: Sequence[str], layout: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, record) for each data row of a CSV whose header has every `required` column."""
    reader = csv.reader(io.StringIO(read_text(path)))
    header = [h.strip() for h in next(reader, [])]
    absent = [c for c in required if c not in header]
    if absent:
        raise AnnotationError(
            f"{path}: not {layout}: expected the columns {','.join(required)} "
            f"(missing {','.join(absent)}; found {','.join(header) or 'no header'})"
        )
    rows = []
    for fields in reader:
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise AnnotationError(
                f"{path}:{reader.line_num}: not {layout}: {len(fields)} fields, the header has {len(header)}"
            )
        rows.append((reader.line_num, dict(zip(header, (f.strip() for f in fields)))))
    return rows


def read_json(path: Path, layout: str) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not {layout}: not JSON ({err.msg}, line {err.lineno})") from None


def read_records(path: Path, keys: Sequence[str], layout: str) -> list[dict[str, Any]]:
    """A JSON list of objects that each have `keys`."""
    data = read_json(path, layout)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: not {layout}: expected a JSON list of objects with {', '.join(keys)}")
    for n, rec in enumerate(data):
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            raise AnnotationError(
                f"{path}: not {layout}: entry {n} is not an object with {', '.join(keys)}: {str(rec)[:80]}"
            )
    return data


def text_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of each non-blank line."""
    return [(n, line.split()) for n, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]


def number(text: Any, where: str, kind: type = float) -> Any:
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise AnnotationError(
            f"{where}: {text!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None


def split_name(text: str, where: str) -> str:
    split = _SPLIT_NAMES.get(text.strip().lower())
    if split is None:
        raise AnnotationError(f"{where}: split {text!r} is none of {', '.join(sorted(_SPLIT_NAMES))}")
    return split


def fold_files(paths: list[Path], pattern: str, fold: int) -> list[Path]:
    """The files whose name matches `pattern` (one group: the fold number) for this fold."""
    return [p for p in paths if (m := re.search(pattern, p.name, re.I)) and int(m.group(1)) == fold]


# --------------------------------------------------------------------------------------------- videos


class VideoIndex:
    """Every video file under ROOT (one recursive walk, symlinked folders followed once), by relative
    path and by file stem; several files with one stem are kept in path order."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(os.path.abspath(root))
        if not self.root.is_dir():
            raise AnnotationError(f"--videos {root}: no such directory")
        self.paths: set[str] = set()
        self.stems: dict[str, list[str]] = {}
        seen: set[str] = set()
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()
            rel_folder = Path(folder).relative_to(self.root).as_posix()
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in VIDEO_EXTENSIONS:
                    rel = name if rel_folder == "." else f"{rel_folder}/{name}"
                    self.paths.add(rel)
                    self.stems.setdefault(stem, []).append(rel)
        for found in self.stems.values():
            found.sort()

    def get(self, rel: str) -> str | None:
        return rel if rel in self.paths else None

    def find(self, stem: str, prefer: Iterable[str] = ()) -> str | None:
        """The video named `stem` (any extension, any folder); among several, the first in a folder named
        one of `prefer`, else the first by path."""
        found = self.stems.get(stem)
        if not found:
            return None
        prefer = {p for p in prefer if p}
        return next((rel for rel in found if prefer & set(rel.split("/")[:-1])), found[0])


# --------------------------------------------------------------------------------------------- output


def seconds(x: float | None) -> str:
    """A time in seconds as the shortest exact-enough text: 84.0 -> '84', 1.89 -> '1.89', None -> ''."""
    return "" if x is None else (f"{x:.6f}".rstrip("0").rstrip(".") or "0")


def _cell(x: int | None) -> str:
    return "" if x is None else str(x)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Create or replace a CSV atomically: written beside it, then renamed over it."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def manifest_path(video: Path, folder: Path) -> str:
    """The video's path as the manifest holds it: relative to the manifest's folder when under it."""
    try:
        return video.relative_to(folder).as_posix()
    except ValueError:
        return video.as_posix()


def write_outputs(conv: Converted, root: Path, out: str | os.PathLike[str]) -> Summary:
    """Write the missing-videos list (`<out stem>.missing.csv`, always) and then the manifest, each
    atomically, rows sorted by (path, start, annotation id) so that a rerun writes the same bytes."""
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    missing_file = missing_path(out)
    miss = sorted(conv.missing, key=lambda m: (m["split"], m["id"], m["expected"]))
    _write_csv(missing_file, MISSING_COLUMNS, ([m[c] for c in MISSING_COLUMNS] for m in miss))
    if not conv.rows:
        raise AnnotationError(
            f"none of the {len(miss)} videos the annotations name is under --videos {root} "
            f"(listed in {missing_file}); no manifest written"
        )
    records = []
    for r in conv.rows:
        values = {
            **r.meta,
            "path": manifest_path(root / r.video, out.parent),
            "label": r.label,
            "split": r.split,
            "start": seconds(r.start),
            "end": seconds(r.end),
            "start_frame": _cell(r.start_frame),
            "end_frame": _cell(r.end_frame),
            "id": r.id,
        }
        key = (values["path"], r.start is not None, r.start or 0.0, r.start_frame or 0, r.id)
        records.append((key, [values.get(c, "") for c in conv.columns]))
    records.sort(key=lambda kv: kv[0])
    _write_csv(out, conv.columns, (v for _, v in records))
    per_split = Counter(r.split for r in conv.rows)
    return Summary(
        out=out,
        missing_file=missing_file,
        rows=len(conv.rows),
        videos=len({r.video for r in conv.rows}),
        per_split={s: per_split[s] for s in ("train", "val", "test") if per_split[s]},
        missing=len(miss),
        missing_videos=len({m["expected"] for m in miss}),
        notes=conv.notes,
    )
