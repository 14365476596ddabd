"""`lvmae ingest survey`: the counts against a corpus written in every container users bring
(tests/real_videos.py), the clip count against what `ingest clips` writes, segments from a manifest, object
storage, the printout and the JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import pytest
from real_videos import FORMATS, NEEDS_FFMPEG_CLI, UNDECODABLE, write_format
from videos import write_ramp_video

import ingest.clips
from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.survey import DURATION_BINS, FPS_BINS, format_report, histogram, survey
from lvmae_cli.main import main

SPEC = ClipSpec(num_frames=8, size=32)
# libav's (first) format name for each extension the writers use
CONTAINERS = {
    ".mp4": "mov", ".mov": "mov", ".3gp": "mov", ".avi": "avi", ".webm": "matroska", ".mkv": "matroska",
    ".gif": "gif", ".ts": "mpegts", ".m2ts": "mpegts", ".flv": "flv", ".mpg": "mpeg", ".ogv": "ogg",
    ".wmv": "asf", ".webp": "webp_pipe",
}  # fmt: skip
VFR = {"mp4_vfr", "mkv_vfr", "avi_ms_vfr"}
FULL_RANGE = {"avi_mjpeg_full", "mp4_h264_full"}
TEN_BIT = {"mp4_hevc10_bt2020", "mov_prores10_bt709"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every format (Theora only with the ffmpeg CLI), a text file, an empty .mp4, a 5-frame video and a
    truncated one. -> (folder, {name: Written})."""
    root = tmp_path_factory.mktemp("survey")
    d = root / "corpus"
    d.mkdir()
    names = [n for n in FORMATS if n not in NEEDS_FFMPEG_CLI or shutil.which("ffmpeg")]
    written = {n: write_format(n, d) for n in names}
    (d / "notes.txt").write_text("not a video\n")
    (d / "empty.mp4").write_bytes(b"")
    write_ramp_video(d / "short.mp4", 5)
    full = write_ramp_video(root / "full.mkv", 80, codec="libvpx-vp9")
    (d / "truncated.mkv").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return d, written


@pytest.fixture(scope="module")
def report(corpus):
    return survey([str(corpus[0])], SPEC, workers=2)


def test_counts_match_what_was_written(corpus, report):
    written = corpus[1]
    usable = [n for n in written if n not in UNDECODABLE]
    n = len(usable) + 2  # + short.mp4 and truncated.mkv
    assert report["sources"] == {
        "rows": len(written) + 3,
        "files": len(written) + 3,
        "segments": 0,
        "usable_files": n,
        "unusable_files": 2,
        "passed_over": 1,
    }
    files = report["files"]
    containers = Counter(CONTAINERS[w.path.suffix] for name, w in written.items() if name in usable)
    containers.update(["mov", "matroska"])
    assert (
        files["container"] == {k: containers[k] for k in files["container"]} and sum(containers.values()) == n
    )
    assert files["rate"] == {"constant": n - len(VFR), "variable": len(VFR)}
    assert files["rotation"] == {"0": n - 3, "180": 1, "270": 1, "90": 1}
    assert files["range"] == {"limited": n - len(FULL_RANGE), "full": len(FULL_RANGE)}
    assert files["bit_depth"] == {"8": n - len(TEN_BIT), "10": len(TEN_BIT)}
    assert files["codec"]["hevc"] == files["codec"]["prores"] == files["codec"]["gif"] == 1
    assert files["matrix"]["bt709 (tagged)"] == 2 and files["matrix"]["bt2020 (tagged)"] == 1
    assert files["damage"] == {"intact": n - 1, "truncated": 1}
    assert [Path(d["source"]).name for d in report["damaged"]] == ["truncated.mkv"]
    assert sum(files["frame_count"].values()) == n and files["below_clip_size"] == 0
    hist = report["histograms"]
    assert all(sum(h.values()) == n for h in hist.values())
    assert hist["fps"] == {"<20": 2, "20-24": 3, "25": n - 5, "26-30": 0, "31-50": 0, "51-60": 0, ">60": 0}
    shapes = [w.size for name, w in written.items() if name in usable] + [(96, 64)] * 2
    assert hist["orientation"]["portrait"] == sum(h > w for w, h in shapes) == 3
    assert hist["short_side"]["<240"] == n

    skipped = report["skipped"]
    assert skipped["unusable"]["reasons"] == {"empty": 1, "no-size": 1}
    assert {Path(e["source"]).name for e in skipped["unusable"]["files"]} == {"empty.mp4", "webp_anim.webp"}
    assert skipped["passed_over"]["reasons"] == {"other-file": 1}
    (short,) = skipped["too_short"]["rows"]
    assert Path(short["source"]).name == "short.mp4" and short["source_frames"] == 5
    assert report["clips"]["per_row"]["0"] == 1 and report["clips"]["rows"] == n

    est = report["estimate"]
    assert est["measured"]["seconds"] > 0 and est["size_basis"].startswith("measured")
    assert est["output_bytes"] == report["clips"]["total"] * est["measured"]["sample_bytes"]
    assert est["ingest_seconds"] > est["probe_seconds"] > 0 and est["parallel"] <= 2

    text = format_report(report)
    assert "variable 3" in text and "full 2" in text and "truncated.mkv" in text and "no-size 1" in text
    assert "measured: scanning and probing" in text and "not measured" not in text


def test_histogram_bins():
    assert histogram([0.5, 1.99, 2, 9.9, 10, 60, 599, 600, 7200], DURATION_BINS) == {
        "<2 s": 2,
        "2-10 s": 2,
        "10-60 s": 1,
        "1-10 min": 2,
        ">10 min": 2,
    }
    assert list(histogram([round(23.976), round(29.97), 25, 60, 120], FPS_BINS).values()) == [
        0,
        1,
        1,
        1,
        0,
        1,
        1,
    ]


def test_clip_count_is_what_ingest_writes(corpus, tmp_path):
    folder, _ = corpus
    small = tmp_path / "small"
    small.mkdir()
    for name in (
        "mp4_h264.mp4",
        "mkv_vfr.mkv",
        "mp4_rot90.mp4",
        "gif.gif",
        "mpegts.ts",
        "short.mp4",
        "empty.mp4",
    ):
        shutil.copy(folder / name, small / name)
    report = survey([str(small)], SPEC)
    out = tmp_path / "ds"
    summary = ingest_clips([str(small)], str(out), IngestConfig(clip=SPEC), progress=False)
    index = json.loads((out / "index.json").read_text())
    assert report["clips"]["total"] == summary.clips_planned == index["num_samples"] > 0
    assert report["clips"]["per_split_label"] == index["labels"]["counts"]
    assert report["skipped"]["too_short"]["count"] == summary.too_short == 1
    assert report["skipped"]["unusable"]["count"] == summary.bad_sources == 1
    # the measured clip is the very clip ingest writes, byte for byte, and takes the bytes in the tar it said
    measured = report["estimate"]["measured"]
    with tarfile.open(out / index["shards"][0]["name"]) as tar:
        members = {m.name: m for m in tar.getmembers()}
        clip = tar.extractfile(members[f"{measured['key']}.webm"]).read()
        meta = members[f"{measured['key']}.json"]
    assert len(clip) == measured["bytes"]
    assert measured["sample_bytes"] == 1024 + -(-len(clip) // 512) * 512 + -(-meta.size // 512) * 512


def test_manifest_segments_are_counted_per_row_and_probed_once(corpus, tmp_path, monkeypatch):
    folder, _ = corpus
    video = shutil.copy(folder / "mp4_h264.mp4", tmp_path / "v.mp4")  # 50 frames at 25 fps
    manifest = tmp_path / "segments.csv"
    manifest.write_text(
        "path,label,split,start,end\n"
        "v.mp4,a,train,0,1\n"  # frames 0..24: clips at 0, 8, 16
        "v.mp4,a,train,0.5,2\n"  # frames 13..49: 13, 21, 29, 37
        "v.mp4,b,val,,\n"  # the whole file: 0, 8, ..., 40
        "v.mp4,c,test,0,0.2\n"  # frames 0..4: too short
    )
    calls = []
    probe = ingest.clips.probe_source
    monkeypatch.setattr(
        ingest.clips, "probe_source", lambda *a, **k: calls.append(a[0].uri) or probe(*a, **k)
    )
    report = survey([str(manifest)], SPEC, measure=False)
    assert calls == [str(video)]
    assert report["sources"] == {
        "rows": 4,
        "files": 1,
        "segments": 3,
        "usable_files": 1,
        "unusable_files": 0,
        "passed_over": 0,
    }
    clips = report["clips"]
    assert clips["total"] == 13 and clips["per_split"] == {"train": 7, "val": 6}
    assert clips["per_label"] == {"a": 7, "b": 6}
    assert clips["per_split_label"] == {"train": {"a": 7}, "val": {"b": 6}}
    assert clips["per_row"] == {"0": 1, "1": 0, "2-9": 3, "10-99": 0, "100+": 0}
    (short,) = report["skipped"]["too_short"]["rows"]
    assert short["segment"] == [0.0, 0.2, "s"] and short["source_frames"] == 5
    est = report["estimate"]
    assert est["measured"] is None and est["ingest_seconds"] is None
    assert "not measured" in format_report(report) and est["size_basis"].startswith("assumed")


def test_command_line_prints_and_writes_json(corpus, report, tmp_path):
    folder, _ = corpus
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "lvmae_cli",
        "ingest",
        "survey",
        str(folder),
        "--frames",
        "8",
        "--size",
        "32",
    ]
    run = subprocess.run(
        [*cmd, "--json", str(out), "--no-measure", "--quiet"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "not measured" in run.stdout and f"report: {out}" in run.stdout
    written = json.loads(out.read_text())
    for part in ("sources", "files", "histograms", "totals", "damaged", "clips", "skipped", "spec"):
        assert written[part] == report[part], part
    assert written["estimate"]["measured"] is None and not list(tmp_path.glob(".*.tmp"))


def test_a_missing_source_is_one_line(tmp_path, capsys):
    assert main(["ingest", "survey", str(tmp_path / "nothing-here"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no such file or directory" in err and len(err.strip().splitlines()) == 1


def test_object_storage_corpus(corpus, s3_bucket, tmp_path):
    folder, _ = corpus
    url, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    local = tmp_path / "local"
    local.mkdir()
    for name in ("mp4_rot90.mp4", "mkv_vfr.mkv", "empty.mp4", "notes.txt"):
        fs.put_file(str(folder / name), f"{url.removeprefix('s3://')}/videos/{name}")
        shutil.copy(folder / name, local / name)
    remote = survey([f"{url}/videos/"], SPEC, storage_options=options)
    here = survey([str(local)], SPEC)
    for part in ("files", "histograms", "totals"):
        assert remote[part] == here[part], part
    assert remote["clips"]["total"] == here["clips"]["total"] > 0
    assert remote["skipped"]["unusable"]["reasons"] == {"empty": 1}
    assert remote["skipped"]["passed_over"]["reasons"] == {"other-file": 1}
    assert remote["files"]["container"] == {"matroska": 1, "mov": 1}
    assert remote["estimate"]["measured"]["bytes"] == here["estimate"]["measured"]["bytes"]
