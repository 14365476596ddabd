"""The standard video benchmarks' own annotation files -> the manifest CSV `lvmae ingest clips` reads
(`lvmae ingest manifest FORMAT ANNOTATIONS... --videos ROOT --out manifest.csv`).

    summary = build_manifest("kinetics", ["kinetics400/train.csv"], "kinetics400/videos", "k400.csv")
    print(summary.line())

One module per format turns its files into rows (`Converted`); common.py finds the videos under ROOT
(one scan) and writes the manifest (path relative to the manifest's folder when under it, label, split,
optional start/end seconds or half-open start_frame/end_frame, metadata) sorted and atomically, plus
`<out stem>.missing.csv` listing every annotation whose video is not under ROOT.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ingest.benchmarks import diving48, epic, hmdb51, kinetics, ssv2, ucf101
from ingest.benchmarks.common import (
    AnnotationError,
    Converted,
    Options,
    Summary,
    VideoIndex,
    expand,
    write_outputs,
)

__all__ = ["FORMATS", "AnnotationError", "Summary", "build_manifest", "format_table"]


@dataclass(frozen=True)
class Format:
    convert: Callable[[list[tuple[Path, bool]], VideoIndex, Options], Converted]
    help: str
    options: tuple[str, ...] = ()  # which of --label / --fold apply


FORMATS: dict[str, Format] = {
    "kinetics": Format(kinetics.convert, kinetics.HELP),
    "ssv2": Format(ssv2.convert, ssv2.HELP),
    "diving48": Format(diving48.convert, diving48.HELP),
    "epic-kitchens-100": Format(epic.convert, epic.HELP, ("label",)),
    "ucf101": Format(ucf101.convert, ucf101.HELP, ("fold",)),
    "hmdb51": Format(hmdb51.convert, hmdb51.HELP, ("fold",)),
}


def format_table() -> str:
    width = max(map(len, FORMATS))
    return "\n".join(f"  {name:<{width}}  {f.help}" for name, f in FORMATS.items())


def build_manifest(
    fmt: str,
    annotations: Sequence[str | os.PathLike[str]],
    videos: str | os.PathLike[str],
    out: str | os.PathLike[str],
    label: str | None = None,
    fold: int | None = None,
) -> Summary:
    """Convert `annotations` (files, or folders holding them) of benchmark `fmt` into the manifest `out`
    for the videos under `videos`. AnnotationError: unknown format, an option it does not take, a file
    unreadable or not in the published layout, no video found at all."""
    spec = FORMATS.get(fmt)
    if spec is None:
        raise AnnotationError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    for name, value in (("label", label), ("fold", fold)):
        if value is not None and name not in spec.options:
            takers = [n for n, f in FORMATS.items() if name in f.options]
            raise AnnotationError(f"--{name} is for {' and '.join(takers)}, not {fmt}")
    if fold is not None and fold not in (1, 2, 3):
        raise AnnotationError(f"--fold {fold}: the folds are 1, 2 and 3")
    files = expand(annotations, Path(os.path.abspath(out)))
    index = VideoIndex(videos)
    return write_outputs(spec.convert(files, index, Options(label=label, fold=fold)), index.root, out)
