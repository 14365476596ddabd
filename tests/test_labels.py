"""Labels and splits: drawn by source video, stratified, saved with the data set, read by the loader."""

import json
import tarfile
from pathlib import Path

import pytest
from videos import write_ramp_video

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.labels import LabelError, LabelSpec, SampleFilter, draw_splits, normalize_split
from train.loader import ClipLoader, LoaderError


def test_draw_splits_is_by_source_stratified_and_seeded():
    sources = [(f"/v/{c}{i}.mp4", c) for c in "ab" for i in range(20)] + [
        (f"/v/u{i}.mp4", None) for i in range(10)
    ]
    got = draw_splits(sources, seed=0, val_share=0.1, test_share=0.2)
    assert set(got) == {u for u, _ in sources}
    for cls, n in (("a", 20), ("b", 20), ("u", 10)):
        splits = [got[u] for u, _ in sources if Path(u).name.startswith(cls)]
        assert splits.count("test") == round(0.2 * n) and splits.count("val") == round(0.1 * n)
    assert draw_splits(list(reversed(sources)), 0, 0.1, 0.2) == got  # the order given does not matter
    other = draw_splits(sources, seed=1, val_share=0.1, test_share=0.2)
    assert other != got and sorted(other.values()) == sorted(got.values())


def test_normalize_split_names():
    assert [normalize_split(v, "m") for v in ("Train", "validation", " test ")] == ["train", "val", "test"]
    with pytest.raises(LabelError, match="'dev' is not one of train, val, test"):
        normalize_split("dev", "m.csv")


def _tar_metas(root: Path) -> list[dict]:
    out = []
    for shard in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """12 videos of 40 frames in 3 classes, cut into overlapping 16-frame clips (stride 8: 4 per video);
    two videos get their split from the manifest."""
    root = tmp_path_factory.mktemp("labelled")
    rows = ["path,label,split"]
    for i in range(12):
        write_ramp_video(root / f"v{i:02d}.mp4", 40, size=(32, 32))
        split = {0: "test", 1: "Validation"}.get(i, "")
        rows.append(f"v{i:02d}.mp4,{'abc'[i % 3]},{split}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = IngestConfig(
        clip=ClipSpec(num_frames=16, size=32, clip_stride=8), shard_clips=5, val_share=0.25, test_share=0.25
    )
    ingest_clips([str(root / "manifest.csv")], str(root / "data"), cfg, progress=False)
    return root / "data"


def test_ingest_writes_labels_splits_and_class_map(labelled):
    index = json.loads((labelled / "index.json").read_text())
    entry = index["labels"]
    assert entry["classes"] == ["a", "b", "c"] and entry["split_seed"] == 0
    metas = _tar_metas(labelled)
    assert len(metas) == 12 * 4
    by_source: dict[str, set] = {}
    for m in metas:
        by_source.setdefault(m["source"], set()).add(m["split"])
    assert all(len(s) == 1 for s in by_source.values())  # a video's windows never straddle splits
    split_of = {Path(k).name: next(iter(v)) for k, v in by_source.items()}
    assert split_of["v00.mp4"] == "test" and split_of["v01.mp4"] == "val"  # the manifest's column wins
    # index counts = what the shards hold; per shard split counts add up to the shard's samples
    counts: dict = {}
    for m in metas:
        counts.setdefault(m["split"], {}).setdefault(m["label"], 0)
        counts[m["split"]][m["label"]] += 1
    assert entry["counts"] == {s: dict(sorted(c.items())) for s, c in counts.items()}
    assert all(sum(s["splits"].values()) == s["samples"] for s in index["shards"])
    assert set(split_of.values()) == {"train", "val", "test"}


def test_loader_reads_one_split_with_its_labels(labelled):
    metas = {m["key"]: m for m in _tar_metas(labelled)}
    seen = []
    loader = ClipLoader(
        str(labelled),
        3,
        split="test",
        labels=True,
        decoder="pyav",
        shuffle_buffer=0,
        epochs=1,
        drop_last=False,
    )
    assert loader.classes == ["a", "b", "c"]
    for batch in loader:
        for key, label in zip(batch["keys"], batch["labels"].tolist()):
            assert metas[key]["split"] == "test" and "abc"[label] == metas[key]["label"]
            seen.append(key)
    assert sorted(seen) == sorted(k for k, m in metas.items() if m["split"] == "test")
    assert loader.stats["skipped"] == 0
    # every split together is the whole data set, each sample once
    total = []
    for split in ("train", "val", "test"):
        loader = ClipLoader(
            str(labelled), 4, split=split, decoder="pyav", shuffle_buffer=0, epochs=1, drop_last=False
        )
        total += [k for b in loader for k in b["keys"]]
    assert sorted(total) == sorted(metas)


def test_loader_resume_inside_a_split(labelled):
    def run(stop_after=None, state=None):
        loader = ClipLoader(
            str(labelled), 2, split="train", labels=True, decoder="pyav", shuffle_buffer=4, epochs=1
        )
        if state:
            loader.load_state_dict(state)
        keys = []
        for i, batch in enumerate(loader):
            keys += batch["keys"]
            if stop_after is not None and i + 1 == stop_after:
                return keys, batch["state"]
        return keys, None

    whole, _ = run()
    first, state = run(stop_after=3)
    rest, _ = run(state=state)
    assert first + rest == whole and len(whole) > 6
    with pytest.raises(LoaderError, match="split=train"):
        ClipLoader(str(labelled), 2, split="val", shuffle_buffer=4).load_state_dict(state)


def test_bad_label_requests_fail_before_reading(labelled, tmp_path):
    index = json.loads((labelled / "index.json").read_text())
    with pytest.raises(LabelError, match="no samples"):
        SampleFilter(
            {**index, "labels": {**index["labels"], "counts": {"train": {"a": 3}}}}, LabelSpec("test"), "d"
        )
    with pytest.raises(LabelError, match="2 of 5 samples have no label"):
        SampleFilter(
            {"labels": {"classes": ["a"], "counts": {"test": {"a": 3, "": 2}}}}, LabelSpec("test", True), "d"
        )
    with pytest.raises(LabelError, match="has no labels"):
        SampleFilter({"labels": {"classes": [], "counts": {"train": {"": 3}}}}, LabelSpec(None, True), "d")
    with pytest.raises(LabelError, match="ingested without labels or splits"):
        SampleFilter({}, LabelSpec("train"), "d")
    with pytest.raises(LoaderError, match=r"split 'test' of .* has no samples"):
        old = tmp_path / "old"
        old.mkdir()
        entry = {**index["labels"], "counts": {"train": index["labels"]["counts"]["train"]}}
        (old / "index.json").write_text(json.dumps({**index, "labels": entry}))
        ClipLoader(str(old), 2, split="test")
