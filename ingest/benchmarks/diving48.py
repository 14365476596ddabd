"""Diving48 (V2): `Diving48_V2_train.json` / `Diving48_V2_test.json`, lists of {"vid_name", "label",
"start_frame", "end_frame"}, and optionally `Diving48_vocab.json`, a list of 48 [takeoff, somersault,
twist, flight position] lists indexed by class ("Back", "15som", "05Twis", "FREE"). Videos:
`{vid_name}.mp4` (any extension) anywhere under ROOT; the split is train or test from the file name.

`end_frame` is the segment's last frame (inclusive: kiyoon/video_datasets_api reads num_frames =
end_frame + 1 with start_frame always 0), so the manifest's half-open end_frame is end_frame + 1. The
label is the class index, or with the vocab file its four parts joined by "_" ("Back_15som_05Twis_FREE")."""

from __future__ import annotations

from pathlib import Path

from ingest.benchmarks.common import (
    AnnotationError,
    Converted,
    Options,
    Row,
    VideoIndex,
    assign,
    need,
    number,
    read_json,
    read_records,
)

FILES = "Diving48_V2_train.json, Diving48_V2_test.json, Diving48_vocab.json"
HELP = "Diving48_V2_{train,test}.json (+ Diving48_vocab.json); {vid_name}.mp4"
COLUMNS = ("path", "label", "split", "start_frame", "end_frame", "id", "class_id")
KEYS = ("vid_name", "label", "start_frame", "end_frame")
LAYOUT = "a Diving48 split JSON (a list of {'vid_name', 'label', 'start_frame', 'end_frame'})"
ROLES = (
    ("vocab", lambda n: "vocab" in n and n.endswith(".json")),
    ("train", lambda n: "train" in n and n.endswith(".json")),
    ("test", lambda n: "test" in n and n.endswith(".json")),
)


def _vocab(paths: list[Path]) -> list[str] | None:
    if not paths:
        return None
    data = read_json(paths[-1], "the Diving48 vocab JSON")
    if not isinstance(data, list) or not all(isinstance(c, list) and c for c in data):
        raise AnnotationError(
            f"{paths[-1]}: not the Diving48 vocab JSON: expected a list of "
            '[takeoff, somersault, twist, flight] lists, e.g. [["Back", "15som", "05Twis", "FREE"], ...]'
        )
    return ["_".join(map(str, c)) for c in data]


def convert(files: list[tuple[Path, bool]], videos: VideoIndex, opts: Options) -> Converted:
    roles = assign(files, ROLES, FILES)
    names = _vocab(roles["vocab"])
    need(roles["train"] + roles["test"], "Diving48_V2_train.json / Diving48_V2_test.json")
    conv = Converted(COLUMNS)
    for split in ("train", "test"):
        for path in roles[split]:
            for i, rec in enumerate(read_records(path, KEYS, LAYOUT)):
                where = f"{path}: entry {i}"
                vid, cls = str(rec["vid_name"]), number(rec["label"], where, int)
                first, last = number(rec["start_frame"], where, int), number(rec["end_frame"], where, int)
                if last < first:
                    raise AnnotationError(f"{where}: end_frame {last} is before start_frame {first}")
                if names is not None and not 0 <= cls < len(names):
                    raise AnnotationError(f"{where}: label {cls} is not a class of the vocab ({len(names)})")
                label = names[cls] if names is not None else str(cls)
                video = videos.find(vid)
                if video is None:
                    conv.miss(vid, split, f"{vid}.mp4")
                else:
                    meta = {"class_id": str(cls)}
                    conv.rows.append(
                        Row(vid, split, label, video, start_frame=first, end_frame=last + 1, meta=meta)
                    )
    return conv
