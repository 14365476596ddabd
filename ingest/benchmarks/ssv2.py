"""Something-Something v2: `something-something-v2-labels.json` ({template: class id string}) and
`something-something-v2-{train,validation,test}.json` (also the newer release's `labels.json`,
`train.json`, `validation.json`, `test.json`). Train and validation hold lists of {"id", "label",
"template", "placeholders"}; the class is the template with its square brackets removed, which is how it
matches the labels file (TSM's and mmaction2's list generators do the same). The test file holds only
{"id"}: rows of split test with no label. Videos: `{id}.webm` (any extension) anywhere under ROOT."""

from __future__ import annotations

import json
from pathlib import Path

from ingest.benchmarks.common import (
    AnnotationError,
    Converted,
    Options,
    Row,
    VideoIndex,
    assign,
    need,
    read_json,
    read_records,
)

FILES = "something-something-v2-labels.json, -train.json, -validation.json, -test.json"
HELP = "something-something-v2-{labels,train,validation,test}.json; {id}.webm"
COLUMNS = ("path", "label", "split", "id", "class_id", "caption", "placeholders")
LAYOUT = "a Something-Something v2 annotation JSON"
ROLES = (
    ("labels", lambda n: n.endswith("labels.json")),
    ("train", lambda n: n.endswith("train.json")),
    ("val", lambda n: n.endswith("validation.json")),
    ("test", lambda n: n.endswith("test.json")),
)


def _classes(paths: list[Path]) -> dict[str, str] | None:
    if not paths:
        return None
    classes: dict[str, str] = {}
    for path in paths:
        data = read_json(path, "the Something-Something v2 labels JSON")
        if not isinstance(data, dict) or not all(isinstance(v, (str, int)) for v in data.values()):
            raise AnnotationError(
                f"{path}: not the Something-Something v2 labels JSON: expected an object "
                '{"template": "class id", ...}'
            )
        classes.update({k: str(v) for k, v in data.items()})
    return classes


def convert(files: list[tuple[Path, bool]], videos: VideoIndex, opts: Options) -> Converted:
    roles = assign(files, ROLES, FILES)
    classes = _classes(roles["labels"])
    need(roles["train"] + roles["val"] + roles["test"], "-train/-validation/-test.json")
    conv = Converted(COLUMNS)
    for split in ("train", "val", "test"):
        keys = ("id",) if split == "test" else ("id", "template")
        for path in roles[split]:
            for rec in read_records(path, keys, f"{LAYOUT} (a list of {{{', '.join(map(repr, keys))}}})"):
                vid = str(rec["id"])
                label = class_id = ""
                if split != "test":
                    label = str(rec["template"]).replace("[", "").replace("]", "")
                    if classes is not None:
                        if label not in classes:
                            raise AnnotationError(
                                f"{path}: id {vid}: class {label!r} is not in the labels JSON"
                            )
                        class_id = classes[label]
                meta = {
                    "class_id": class_id,
                    "caption": str(rec.get("label", "")),
                    "placeholders": json.dumps(rec["placeholders"]) if "placeholders" in rec else "",
                }
                video = videos.find(vid)
                if video is None:
                    conv.miss(vid, split, f"{vid}.webm")
                else:
                    conv.rows.append(Row(vid, split, label, video, meta=meta))
    return conv
