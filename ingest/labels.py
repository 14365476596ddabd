"""Labels and splits of a clip data set: the format shared by ingest (writer) and training (reader).

Ingest gives every source video a split (`train`, `val` or `test`): the manifest's `split` column where it
has one, else a seeded, label-stratified draw over the sorted source list. All clips of a video share its
split, so overlapping windows of one video never straddle splits. Each sample's KEY.json carries `split`
(and `label`, from the manifest); index.json carries the class map and the counts:

    "labels": {"classes": ["a", "b"],                       # class id = position in this sorted list
               "split_seed": 0, "val_share": 0.1, "test_share": 0.1,
               "counts": {"train": {"a": 40, "b": 38}, "val": {...}, "test": {...}}}   # "" = no label

A data set ingested before splits existed has no "labels" entry: it trains unsplit, and asking it for a
split or for labels is refused with one clear line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")
ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
ALIASES |= {"test": "test", "testing": "test"}
NO_LABEL = ""  # the counts' key for samples without a label


class LabelError(ValueError):
    """Labels or splits that cannot be used as asked (no labels, empty split, unknown class): a user error."""


def normalize_split(value: Any, where: str) -> str:
    """A manifest's split value -> train / val / test."""
    name = ALIASES.get(str(value).strip().lower())
    if name is None:
        raise LabelError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return name


def draw_splits(
    sources: list[tuple[str, str | None]], seed: int, val_share: float, test_share: float
) -> dict[str, str]:
    """(uri, label) pairs -> {uri: split}. Per label (unlabelled sources form one group), the group's
    sources are sorted, permuted by a generator seeded with (seed, group), and the first
    round(test_share * n) go to test, the next round(val_share * n) to val, the rest to train."""
    groups: dict[str, list[str]] = {}
    for uri, label in sources:
        groups.setdefault(label or NO_LABEL, []).append(uri)
    out = {}
    for label, uris in sorted(groups.items()):
        uris = sorted(set(uris))
        digest = [int(b) for b in label.encode()]
        order = np.random.default_rng([seed, len(digest), *digest]).permutation(len(uris))
        n_test = round(test_share * len(uris))
        n_val = round(val_share * len(uris))
        for rank, i in enumerate(order.tolist()):
            out[uris[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def assign_splits(sources: list[Any], seed: int, val_share: float, test_share: float) -> list[Any]:
    """Sources (ingest.sources.Source) with meta["split"] set: the manifest row's, or drawn per source
    video (draw_splits, stratified by the label of the video's first row), so that every segment of one
    file shares its split unless the manifest says otherwise."""
    first_label: dict[str, str | None] = {}
    for s in sources:
        if not s.meta.get("split"):
            first_label.setdefault(s.uri, s.label)
    drawn = draw_splits(list(first_label.items()), seed, val_share, test_share)

    def split(s: Any) -> str:
        return normalize_split(s.meta["split"], s.uri) if s.meta.get("split") else drawn[s.uri]

    return [dataclasses.replace(s, meta={**s.meta, "split": split(s)}) for s in sources]


def count(samples: Iterable[tuple[str | None, str | None]]) -> dict[str, dict[str, int]]:
    """(split, label) per sample -> {split: {label or "": n}}."""
    out: dict[str, dict[str, int]] = {}
    for split, label in samples:
        per = out.setdefault(split or "train", {})
        per[label or NO_LABEL] = per.get(label or NO_LABEL, 0) + 1
    return out


def merge_counts(parts: Iterable[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for split, per in part.items():
            dst = out.setdefault(split, {})
            for label, n in per.items():
                dst[label] = dst.get(label, 0) + n
    return {s: dict(sorted(out[s].items())) for s in SPLITS if s in out}


def index_entry(
    counts: dict[str, dict[str, int]], seed: int, val_share: float, test_share: float
) -> dict[str, Any]:
    """index.json's "labels" entry."""
    classes = sorted({label for per in counts.values() for label in per if label != NO_LABEL})
    return {
        "classes": classes,
        "split_seed": seed,
        "val_share": val_share,
        "test_share": test_share,
        "counts": counts,
    }


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """What a reader wants from a data set: one split (None: all samples) and, with labels, class ids."""

    split: str | None = None
    labels: bool = False


class SampleFilter:
    """Which samples of a data set a reader takes, and their class ids, from index.json and each KEY.json.

    Checks everything it can before any clip is read: the data set has splits, the split has samples,
    and (with labels) every sample of the split has a label.
    """

    def __init__(self, index: dict[str, Any], spec: LabelSpec, url: str):
        self.spec = spec
        entry = index.get("labels")
        self.classes: list[str] = list(entry["classes"]) if entry else []
        self.class_ids = {c: i for i, c in enumerate(self.classes)}
        if spec.split is None and not spec.labels:
            self.counts = None
            return
        if entry is None:
            raise LabelError(
                f"{url} was ingested without labels or splits (no 'labels' in its index.json): ingest it "
                "again with this version (a manifest with a label column for labels)"
            )
        if spec.split is not None and spec.split not in SPLITS:
            raise LabelError(f"split {spec.split!r} is not one of {', '.join(SPLITS)}")
        counts = entry["counts"]
        wanted = [spec.split] if spec.split else list(counts)
        per = merge_counts({s: counts.get(s, {})} for s in wanted)
        total = sum(n for p in per.values() for n in p.values())
        where = f"split {spec.split!r} of {url}" if spec.split else url
        if total == 0:
            have = ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items()) or "none"
            raise LabelError(f"{where} has no samples (samples per split: {have})")
        if spec.labels:
            if not self.classes:
                raise LabelError(
                    f"{url} has no labels: ingest a manifest with a 'label' column (ingest/sources.py)"
                )
            missing = sum(p.get(NO_LABEL, 0) for p in per.values())
            if missing:
                raise LabelError(
                    f"{where}: {missing} of {total} samples have no label; label them in the manifest"
                )
        self.counts = {label: sum(p.get(label, 0) for p in per.values()) for label in self.classes}
        self.num_samples = total

    def keep(self, meta: dict[str, Any]) -> bool:
        return self.spec.split is None or meta.get("split", "train") == self.spec.split

    def label_id(self, meta: dict[str, Any]) -> int:
        return self.class_ids[meta["label"]]

    @staticmethod
    def meta(parts: dict[str, bytes]) -> dict[str, Any]:
        return json.loads(parts["json"]) if "json" in parts else {}
