"""EPIC-Kitchens-100 action recognition: `EPIC_100_train.csv` and `EPIC_100_validation.csv` (narration_id,
participant_id, video_id, narration_timestamp, start_timestamp, stop_timestamp, start_frame, stop_frame,
narration, verb, verb_class, noun, noun_class, all_nouns, all_noun_classes) and optionally
`EPIC_100_test_timestamps.csv` (uid, the ids and timestamps only: rows of split test with no label).

Videos: `{participant_id}/videos/{video_id}.MP4` as epic-kitchens/download-scripts-100 lays them out, or
`{video_id}.*` anywhere under ROOT. Each row is a segment of its video: start/end are start_timestamp /
stop_timestamp (`HH:MM:SS.ff`) in seconds. `--label verb|noun|action` picks the label: verb_class,
noun_class, or the pair `{verb_class}_{noun_class}` (the challenge scores an action as that pair).
"""

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
    need,
    number,
    read_csv,
)

FILES = "EPIC_100_train.csv, EPIC_100_validation.csv, EPIC_100_test_timestamps.csv"
HELP = "EPIC_100_{train,validation,test_timestamps}.csv; P01/videos/P01_01.MP4 (--label verb|noun|action)"
COLUMNS = (
    "path", "label", "split", "start", "end", "id", "participant_id", "video_id", "narration",
    "verb", "verb_class", "noun", "noun_class",
)  # fmt: skip
SEGMENT = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp")
LABELS = ("verb", "verb_class", "noun", "noun_class")
LAYOUT = "an EPIC-Kitchens-100 annotation CSV"
ROLES = (
    ("test", lambda n: "test" in n and n.endswith(".csv")),
    ("train", lambda n: "train" in n and n.endswith(".csv")),
    ("val", lambda n: ("validation" in n or "_val" in n) and n.endswith(".csv")),
)
LABEL_CHOICES = ("verb", "noun", "action")
_TIMESTAMP = re.compile(r"^(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)$")


def timestamp(text: str, where: str) -> float:
    """'00:01:02.35' -> 62.35 seconds."""
    m = _TIMESTAMP.match(text)
    if not m:
        raise AnnotationError(f"{where}: timestamp {text!r} is not HH:MM:SS.ff")
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def convert(files: list[tuple[Path, bool]], videos: VideoIndex, opts: Options) -> Converted:
    which = opts.label or "action"
    if which not in LABEL_CHOICES:
        raise AnnotationError(f"--label {which}: epic-kitchens-100 labels are {', '.join(LABEL_CHOICES)}")
    roles = assign(files, ROLES, FILES)
    need(roles["train"] + roles["val"] + roles["test"], FILES)
    conv = Converted(COLUMNS)
    for split in ("train", "val", "test"):
        required = SEGMENT if split == "test" else SEGMENT + LABELS
        for path in roles[split]:
            for n, rec in read_csv(path, required, f"{LAYOUT} ({', '.join(required)})"):
                where = f"{path}:{n}"
                start, end = timestamp(rec["start_timestamp"], where), timestamp(rec["stop_timestamp"], where)
                label = ""
                if split != "test":
                    verb, noun = number(rec["verb_class"], where, int), number(rec["noun_class"], where, int)
                    label = {"verb": str(verb), "noun": str(noun), "action": f"{verb}_{noun}"}[which]
                meta = {c: rec.get(c, "") for c in COLUMNS[6:]}
                nid, vid = rec["narration_id"], rec["video_id"]
                video = videos.find(vid, prefer=(rec["participant_id"], "videos"))
                if video is None:
                    conv.miss(nid, split, f"{rec['participant_id']}/videos/{vid}.MP4")
                else:
                    conv.rows.append(Row(nid, split, label, video, start=start, end=end, meta=meta))
    return conv
