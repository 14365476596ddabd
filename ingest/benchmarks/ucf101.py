"""UCF101: the `ucfTrainTestlist` files, `classInd.txt` ("1 ApplyEyeMakeup"), `trainlist0N.txt`
("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1") and `testlist0N.txt` (the path only), N the fold
(`--fold`, default 1; the other folds' lists are ignored). The label is the class folder of the listed
path (classInd's name; the class index, from classInd or the train line, goes in class_id). Videos:
`ROOT/{class}/{file}.avi` as UCF-101.rar unpacks, or `{file}.*` anywhere under ROOT."""

from __future__ import annotations

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
    number,
    text_lines,
)

FILES = "classInd.txt, trainlist0N.txt, testlist0N.txt"
HELP = "classInd.txt, trainlist0N.txt, testlist0N.txt (--fold N); {class}/{file}.avi"
COLUMNS = ("path", "label", "split", "id", "class_id")
ROLES = (
    ("classes", lambda n: n == "classind.txt"),
    ("train", lambda n: n.startswith("trainlist") and n.endswith(".txt")),
    ("test", lambda n: n.startswith("testlist") and n.endswith(".txt")),
)


def _classes(paths: list[Path]) -> dict[str, int] | None:
    if not paths:
        return None
    classes = {}
    for n, fields in text_lines(paths[-1]):
        if len(fields) != 2:
            raise AnnotationError(f"{paths[-1]}:{n}: not UCF101's classInd.txt: expected 'INDEX CLASS' lines")
        classes[fields[1]] = number(fields[0], f"{paths[-1]}:{n}", int)
    return classes


def convert(files: list[tuple[Path, bool]], videos: VideoIndex, opts: Options) -> Converted:
    fold = opts.fold or 1
    roles = assign(files, ROLES, FILES)
    classes = _classes(roles["classes"])
    lists = {s: fold_files(roles[s], rf"{s}list0?(\d+)\.txt$", fold) for s in ("train", "test")}
    need(lists["train"] + lists["test"], f"trainlist0{fold}.txt / testlist0{fold}.txt (fold {fold})")
    conv = Converted(COLUMNS)
    for split in ("train", "test"):
        width = 2 if split == "train" else 1
        for path in lists[split]:
            for n, fields in text_lines(path):
                where = f"{path}:{n}"
                if len(fields) != width or "/" not in fields[0]:
                    shape = "'CLASS/FILE.avi INDEX'" if split == "train" else "'CLASS/FILE.avi'"
                    raise AnnotationError(f"{where}: not a UCF101 {split}list line: expected {shape}")
                rel = fields[0]
                label, name = rel.split("/", 1)
                index = number(fields[1], where, int) if width == 2 else None
                if classes is not None:
                    if label not in classes:
                        raise AnnotationError(f"{where}: class {label!r} is not in classInd.txt")
                    if index is not None and index != classes[label]:
                        raise AnnotationError(
                            f"{where}: index {index} but classInd.txt gives {label} {classes[label]}"
                        )
                    index = classes[label]
                stem = Path(name).stem
                video = videos.get(rel) or videos.find(stem, prefer=(label,))
                if video is None:
                    conv.miss(stem, split, rel)
                else:
                    meta = {"class_id": "" if index is None else str(index)}
                    conv.rows.append(Row(stem, split, label, video, meta=meta))
    return conv
