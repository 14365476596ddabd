"""HMDB51: the `testTrainMulti_7030_splits` files `{class}_test_split{N}.txt`, one line per video of the
class, "VIDEO.avi 1": 1 = train, 2 = test, 0 = not used in split N (those rows are left out and counted).
`--fold N` (default 1) picks the files; the label is the class from the file name. Videos:
`ROOT/{class}/{video}.avi` as hmdb51_org.rar unpacks, or `{video}.*` anywhere under ROOT."""

from __future__ import annotations

import re
from pathlib import Path

from ingest.benchmarks.common import (
    AnnotationError,
    Converted,
    Options,
    Row,
    VideoIndex,
    assign,
    fold_files,
    need,
    text_lines,
)

FILES = "{class}_test_split{N}.txt"
HELP = "{class}_test_split{N}.txt (--fold N; 1 train, 2 test, 0 unused); {class}/{video}.avi"
COLUMNS = ("path", "label", "split", "id")
ROLES = (("split", lambda n: re.search(r"_test_split\d+\.txt$", n) is not None),)
SPLITS = {"1": "train", "2": "test"}


def convert(files: list[tuple[Path, bool]], videos: VideoIndex, opts: Options) -> Converted:
    fold = opts.fold or 1
    paths = fold_files(assign(files, ROLES, FILES)["split"], r"_test_split(\d+)\.txt$", fold)
    need(paths, f"{{class}}_test_split{fold}.txt (fold {fold})")
    conv = Converted(COLUMNS)
    unused = 0
    for path in paths:
        label = re.sub(r"_test_split\d+\.txt$", "", path.name, flags=re.I)
        for n, fields in text_lines(path):
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise AnnotationError(
                    f"{path}:{n}: not an HMDB51 split file: expected 'VIDEO.avi 0|1|2' lines, got {' '.join(fields)!r}"
                )
            if fields[1] == "0":
                unused += 1
                continue
            split, stem = SPLITS[fields[1]], Path(fields[0]).stem
            video = videos.get(f"{label}/{fields[0]}") or videos.find(stem, prefer=(label,))
            if video is None:
                conv.miss(stem, split, f"{label}/{fields[0]}")
            else:
                conv.rows.append(Row(stem, split, label, video))
    conv.notes.append(f"{unused} rows marked 0 (not in split {fold}) left out")
    return conv
