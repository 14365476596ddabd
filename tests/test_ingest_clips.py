import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import pytest
import webdataset as wds
from videos import decode_means, level, write_audio_only, write_ramp_video

from ingest.clip_plan import sample_key
from ingest.clips import IngestError, ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.storage import Store


def cfg(frames=32, size=64, **kw):
    clip = {k: kw.pop(k) for k in ("fps", "frame_stride", "clip_stride", "codec") if k in kw}
    return IngestConfig(clip=ClipSpec(num_frames=frames, size=size, **clip), **kw)


def shard_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.json"))]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample_dir(sample_videos, tmp_path_factory):
    d = tmp_path_factory.mktemp("samples")
    for name, path in sample_videos.items():
        os.symlink(path, d / f"{name}.mp4")
    return d


@pytest.fixture(scope="module")
def sample_dataset(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "ds"
    summary = ingest_clips([str(sample_dir)], str(out), cfg(shard_clips=5), progress=False)
    return out, summary


def test_real_videos_clip_counts_index_and_read_back(sample_dataset, sample_videos):
    out, summary = sample_dataset
    # 132, 250, 120 and 120 frames -> 4 + 7 + 3 + 3 clips of 32 frames.
    assert (summary.clips_planned, summary.num_samples, summary.bad_sources) == (17, 17, 0)
    index = json.loads((out / "index.json").read_text())
    assert index["format_version"] == 1 and index["num_samples"] == 17
    assert index["clip_spec"]["num_frames"] == 32 and index["clip_spec"]["codec"] == "vp9"
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 2]
    for shard in index["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        listing = subprocess.run(
            ["tar", "tf", str(out / shard["name"])], capture_output=True, text=True, check=True
        )
        names = listing.stdout.split()
        assert len(names) == 2 * shard["samples"] and {n.rsplit(".", 1)[1] for n in names} == {"webm", "json"}

    urls = [str(out / s["name"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 17 and len({s["__key__"] for s in samples}) == 17
    bikes = str(sample_videos["bikes"].resolve())
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] == sample_key(meta["source"], meta["start_frame"])
        assert meta["sha256"] == hashlib.sha256(s["webm"]).hexdigest()
        assert meta["num_frames"] == 32 and meta["size"] == [64, 64]
    first = next(s for s in samples if json.loads(s["json"])["source"].endswith("bikes.mp4"))
    assert json.loads(first["json"])["source_size"] == [640, 272] and bikes
    with av.open(io.BytesIO(first["webm"])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert c.streams.video[0].codec_context.name == "vp9"
    assert len(frames) == 32 and frames[0].shape == (64, 64, 3)


def test_rerun_is_a_no_op_and_a_changed_spec_is_refused(sample_dir, sample_dataset):
    out, _ = sample_dataset
    before = tree_bytes(out)
    again = ingest_clips([str(sample_dir)], str(out), cfg(shard_clips=5), progress=False)
    assert again.samples_written == 0 and again.shards_skipped == 4
    assert tree_bytes(out) == before
    with pytest.raises(IngestError, match="different"):
        ingest_clips([str(sample_dir)], str(out), cfg(frames=16, shard_clips=5), progress=False)


def test_frame_accurate_windows_with_stride_and_overlap(tmp_path):
    src = write_ramp_video(tmp_path / "ramp.mp4", 48)
    out = tmp_path / "ds"
    ingest_clips(
        [str(src)], str(out), cfg(frames=16, frame_stride=2, clip_stride=8, shard_clips=100), progress=False
    )
    shard = next((out / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    starts = [json.loads(s["json"])["start_frame"] for s in samples]
    # 16 frames every 2nd source frame span 31 frames; a clip starts every 8 clip frames = 16 source frames.
    assert starts == [0, 16]  # overlapping: frames 0..30 and 16..46
    for s in samples:
        start = json.loads(s["json"])["start_frame"]
        means = decode_means(s["webm"])
        expected = [level(start + 2 * j) for j in range(16)]
        assert len(means) == 16
        # Neighbouring source frames differ by 5 grey levels; two YUV round trips move a level by <= 2.
        assert max(abs(m - e) for m, e in zip(means, expected)) < 2.5, (start, means[:4], expected[:4])


def test_bad_files_are_skipped_and_reported(tmp_path, sample_videos):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.mp4").write_bytes(b"")
    (corpus / "notes.mp4").write_text("not a video at all\n" * 100)
    write_audio_only(corpus / "audio.mp4")
    write_ramp_video(corpus / "short.mp4", 10)
    full = write_ramp_video(tmp_path / "full.mkv", 80, codec="libvpx-vp9")
    (corpus / "truncated.mkv").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    shutil.copy(sample_videos["carphone_pristine"], corpus / "good.mp4")
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(
        json.dumps({"path": "corpus/good.mp4", "label": "phone"})
        + "\n"
        + json.dumps({"path": "corpus/missing.mp4"})
        + "\n"
    )
    out = tmp_path / "ds"
    cmd = [
        sys.executable,
        "-m",
        "lvmae_cli",
        "ingest",
        "clips",
        str(corpus),
        str(manifest),
        "--out",
        str(out),
    ]
    cmd += ["--frames", "16", "--size", "32", "--shard-clips", "4", "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    records = {Path(e["source"]).name: e for e in lines}
    errors = {name: e["reason"] for name, e in records.items()}
    assert errors["empty.mp4"] == "empty"
    assert errors["notes.mp4"] == "not-a-video"
    assert errors["audio.mp4"] == "no-video-stream"
    assert errors["missing.mp4"] == "unreadable"
    assert errors["truncated.mkv"] == "truncated"
    assert errors["short.mp4"] == "too-short"  # 10 frames: no 16-frame clip; reported, not a bad file
    assert {k: records["short.mp4"][k] for k in ("source_frames", "source_frames_needed")} == {
        "source_frames": 10,
        "source_frames_needed": 16,
    }
    index = json.loads((out / "index.json").read_text())
    # the 5 sources that yield no clip (4 bad, 1 too short), truncated.mkv (its whole clips kept: counted
    # from its packets, the header's duration says more), then any clip it could not complete
    assert index["num_errors"] == len(lines) == 6 + sum(len(sh["errors"]) for sh in shard_records(out))
    # good.mp4 (120 frames) gives 7 clips; the first half of truncated.mkv still gives its clips.
    assert index["num_samples"] >= 7
    labels = [
        json.loads(s["json"]).get("label")
        for sh in index["shards"]
        for s in wds.WebDataset(str(out / sh["name"]), shardshuffle=False)
    ]
    assert labels.count("phone") == 7
    assert "skipped" in run.stdout and "empty" in run.stdout and "1 too short for a clip" in run.stdout
    assert "short.mp4: too-short: 10 source frames (as probed): a 16-frame clip needs 16" in run.stdout

    strict_cmd = [*cmd[:7], "--out", str(tmp_path / "strict"), *cmd[9:], "--strict"]
    strict = subprocess.run(strict_cmd, capture_output=True, text=True, check=False)
    assert strict.returncode == 2 and "--strict" in strict.stderr and "Traceback" not in strict.stderr


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    write_ramp_video(tmp_path / "short.mp4", 5)
    cmd = [
        sys.executable,
        "-m",
        "lvmae_cli",
        "ingest",
        "clips",
        str(tmp_path),
        "--out",
        str(tmp_path / "ds"),
        "--quiet",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 2 and "nothing to ingest" in run.stderr and "Traceback" not in run.stderr
    assert "1 too short for a 128-frame clip" in run.stderr and "1 unusable (1 empty)" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ds" / "index.json").exists()


def test_too_short_sources_are_reported_and_change_no_clip(tmp_path):
    # Every 2nd frame of 16: a clip spans 31 source frames. 70 frames give 2 clips; 20 frames give 10 of the
    # 16 a clip takes, so none: the source is listed in errors.jsonl, counted, and the plan and clips stay
    # exactly those of the corpus without it.
    long = write_ramp_video(tmp_path / "long.mp4", 70, size=(32, 32))
    short = write_ramp_video(tmp_path / "short.mp4", 20, size=(32, 32))
    spec = dict(frames=16, size=32, frame_stride=2, shard_clips=4)
    alone = ingest_clips([str(long)], str(tmp_path / "alone"), cfg(**spec), progress=False)
    summary = ingest_clips([str(long), str(short)], str(tmp_path / "ds"), cfg(**spec), progress=False)
    assert (alone.too_short, summary.too_short, summary.bad_sources, summary.num_samples) == (0, 1, 0, 2)

    record = {
        "source": str(short.resolve()),
        "reason": "too-short",
        "detail": "20 source frames (as probed; 10 when sampled every 2): a 16-frame clip needs 31",
        "source_frames": 20,
        "source_frames_needed": 31,
        "sampled_frames": 10,
        "clip_frames": 16,
    }
    assert summary.errors == [record]
    out = tmp_path / "ds"
    assert [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()] == [record]
    index, before = (json.loads((d / "index.json").read_text()) for d in (out, tmp_path / "alone"))
    assert (index["num_errors"], before["num_errors"], index["plan"]) == (1, 0, before["plan"])
    assert {k: v for k, v in index.items() if k != "num_errors"} == {
        k: v for k, v in before.items() if k != "num_errors"
    }
    shards = tree_bytes(out / "shards")
    assert shards == tree_bytes(tmp_path / "alone" / "shards") and len(shards) == 2  # one tar, one record


def test_workers_and_nodes_give_the_same_data_set(sample_dir, sample_dataset, tmp_path):
    ref = tree_bytes(sample_dataset[0])
    parallel = tmp_path / "parallel"
    ingest_clips([str(sample_dir)], str(parallel), cfg(shard_clips=5, workers=2), progress=False)
    assert tree_bytes(parallel) == ref
    nodes = tmp_path / "nodes"
    first = ingest_clips(
        [str(sample_dir)], str(nodes), cfg(shard_clips=5, num_nodes=2, node_rank=1), progress=False
    )
    assert not first.index_written and not (nodes / "index.json").exists()
    last = ingest_clips(
        [str(sample_dir)], str(nodes), cfg(shard_clips=5, num_nodes=2, node_rank=0), progress=False
    )
    assert last.index_written
    assert tree_bytes(nodes) == ref


def test_kill_9_then_rerun_gives_the_identical_data_set(sample_dir, tmp_path):
    ref = tmp_path / "ref"
    ingest_clips([str(sample_dir)], str(ref), cfg(size=96, shard_clips=1), progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lvmae_cli", "ingest", "clips", str(sample_dir), "--out", str(out)]
    cmd += ["--frames", "32", "--size", "96", "--shard-clips", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def recorded() -> int:
        return len(list((out / "shards").glob("*.json"))) if (out / "shards").exists() else 0

    deadline = time.monotonic() + 120
    while recorded() < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "shards").glob("*.json")))
    assert 3 <= done < 17, f"the kill should land mid-ingest ({done} shards recorded)"
    assert not (out / "index.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_bytes(out) == tree_bytes(ref)


def test_object_storage_sources_and_output(s3_bucket, sample_dir, sample_dataset, sample_videos):
    url, options = s3_bucket
    store = Store(url, options)
    # Local sources -> S3: byte for byte the local data set.
    ingest_clips([str(sample_dir)], f"{url}/ds", cfg(shard_clips=5, storage_options=options), progress=False)
    local = tree_bytes(sample_dataset[0])
    assert {name: store.read_bytes(f"ds/{name}") for name in local} == local
    # Lose a shard's record (a node died after uploading): the re-run redoes only that shard.
    store.fs.rm_file(store.path("ds/shards/shard-000001.json"))
    again = ingest_clips(
        [str(sample_dir)], f"{url}/ds", cfg(shard_clips=5, storage_options=options), progress=False
    )
    assert (again.samples_written, again.shards_skipped) == (5, 3)
    assert {name: store.read_bytes(f"ds/{name}") for name in local} == local
    # S3 sources: an s3:// prefix is listed, streamed and keyed by its s3:// URI.
    for name in ("bikes", "carphone_pristine"):
        store.fs.put_file(str(sample_videos[name]), store.path(f"raw/{name}.mp4"))
    ingest_clips([f"{url}/raw/"], f"{url}/ds2", cfg(shard_clips=4, storage_options=options), progress=False)
    index = store.read_json("ds2/index.json")
    assert index["num_samples"] == 7 + 3
    data = store.read_bytes(f"ds2/{index['shards'][0]['name']}")
    with tarfile.open(fileobj=io.BytesIO(data)) as shard:
        first_json = next(m for m in shard.getmembers() if m.name.endswith(".json"))
        meta = json.loads(shard.extractfile(first_json).read())
    assert meta["source"] == f"{url}/raw/bikes.mp4" and meta["key"] == sample_key(meta["source"], 0)


def test_h264_option_writes_mp4_clips(sample_videos, tmp_path):
    out = tmp_path / "h264"
    ingest_clips(
        [str(sample_videos["carphone_pristine"])], str(out), cfg(codec="h264", shard_clips=8), progress=False
    )
    index = json.loads((out / "index.json").read_text())
    assert index["clip_spec"]["codec"] == "h264" and index["clip_spec"]["extension"] == "mp4"
    samples = list(wds.WebDataset(str(out / index["shards"][0]["name"]), shardshuffle=False))
    assert len(samples) == 3
    meta = json.loads(samples[1]["json"])
    assert meta["start_frame"] == 32 and meta["start_seconds"] == pytest.approx(32 / (30000 / 1001))
    with av.open(io.BytesIO(samples[0]["mp4"])) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in c.decode(video=0)) == 32
