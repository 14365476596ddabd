"""Real corpora, faithfully: what every clip shows is what its KEY.json says, on files written the way
cameras and sites write them (tests/real_videos.py: variable rate, MPEG-TS offsets, AVI on a millisecond
time base, rotation, full range, 10-bit, BT.601/709/2020, GIF, WebP, and a dozen containers).

Every frame of the test videos shows its own number as a code (real_videos.read_code), so a clip's
frame i can be checked against the source frame shown at start_seconds + i / fps.
"""

from __future__ import annotations

import bisect
import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from real_videos import (
    COLOUR_SOURCES,
    FORMATS,
    NEEDS_FFMPEG_CLI,
    read_code,
    read_patches,
    write_cfr,
    write_format,
    write_rotated,
    write_vfr_mp4,
)

from ingest import shards
from ingest.clip_decode import decode_clip
from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig

HAVE_FFMPEG = shutil.which("ffmpeg") is not None


def ingest(srcs, out: Path, **spec) -> tuple[dict, list[dict], list[tuple[dict, bytes]]]:
    """-> (index.json, errors.jsonl records, [(KEY.json, clip bytes)] of every shard)."""
    cfg = IngestConfig(clip=ClipSpec(**{"num_frames": 8, "size": 32, **spec}), shard_clips=10_000)
    ingest_clips([str(s) for s in srcs], str(out), cfg, progress=False)
    index = json.loads((out / "index.json").read_text())
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    samples = []
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                samples.append((json.loads(data), members[name[: -len(".json")] + ".webm"]))
    return index, errors, samples


def shown(times: list[float], t: float) -> int:
    """The source frame shown at time t: the last one whose time is <= t."""
    return bisect.bisect_right(times, t + 1e-6) - 1


def check_times(meta: dict, data: bytes, times: list[float]) -> None:
    """Every frame of the clip shows the source at start_seconds + i / fps: exactly the frame shown then
    for a clip sampled by time, else within one source frame (constant-rate clips keep their frame-index
    sampling: start + round(i * step))."""
    frames = decode_clip(data, meta["num_frames"])
    got = [read_code(f) for f in frames]
    want = [shown(times, meta["start_seconds"] + i / meta["fps"]) for i in range(len(frames))]
    slack = 0 if meta.get("sampled_by") == "time" else 1
    assert all(g is not None and abs(g - w) <= slack for g, w in zip(got, want)), (meta, got, want)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every format of real_videos in one folder, plus files a scan must pass over or find by content."""
    src = tmp_path_factory.mktemp("corpus")
    written = {}
    for name in FORMATS:
        if name in NEEDS_FFMPEG_CLI and not HAVE_FFMPEG:
            continue
        written[name] = write_format(name, src)
    (src / "notes.txt").write_text("not a video\n")
    shutil.copy(written["mp4_h264"].path, src / "camera.xyz")  # a video under an extension nobody lists
    with av.open(str(src / "still.png"), "w", format="image2") as out:  # one still image
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 32, 32, "rgb24"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
    written["camera"] = written["mp4_h264"]
    out = tmp_path_factory.mktemp("ds") / "ds"
    summary_files = sorted(p.name for p in src.iterdir())
    return src, written, summary_files, ingest([src], out)


def test_every_file_is_accounted_for(corpus):
    _, _, files, (index, errors, samples) = corpus
    ingested = {Path(m["source"]).name for m, _ in samples}
    reported = {Path(e["source"]).name for e in errors}
    assert index["passed_over"] == {"other-file": 1, "still-image": 1}  # notes.txt, still.png
    assert "camera.xyz" in ingested  # found by what libav makes of it, not by its extension
    assert reported == {"webp_anim.webp"}  # libav opens animated WebP but cannot decode it
    assert "no-size" in [e["reason"] for e in errors]
    assert len(ingested) + len(reported) + sum(index["passed_over"].values()) == len(files)
    for name in ("gif", "mpegts", "m2ts", "flv", "3gp", "mpg", "wmv", "avi_ms_vfr", "mkv_vfr"):
        assert any(n.startswith(name + ".") for n in ingested), name
    if HAVE_FFMPEG:
        assert "ogv.ogv" in ingested


def test_every_clip_shows_what_its_metadata_says(corpus):
    """Variable rate (by presentation time), MPEG-TS/PS (measured from the first frame), AVI on a 1/1000
    time base (counted from its packets, not its 1,401-slot header), rotated (upright): frame i of every
    clip is the source frame shown at start_seconds + i / fps."""
    _, written, _, (_, _, samples) = corpus
    by_name = {}
    for meta, data in samples:
        name = Path(meta["source"]).stem
        by_name.setdefault(name, []).append(meta)
        check_times(meta, data, written[name].times)
    for name in ("mp4_vfr", "mkv_vfr", "avi_ms_vfr"):
        metas = by_name[name]
        assert all(m["sampled_by"] == "time" for m in metas), name
        # sampled at the average rate: 70 frames over 2.9 s (69 intervals), 35 over 1.4 s
        span = written[name].times[-1]
        assert metas[0]["fps"] == pytest.approx((written[name].frames - 1) / span)
        assert len(metas) == int((span + 1 / metas[0]["fps"]) * metas[0]["fps"] // 8)
    for name in ("mp4_h264", "mpegts", "gif"):  # constant rate: every source frame, as before
        assert all("sampled_by" not in m and m["frame_step"] == 1 for m in by_name[name])
    assert {by_name[f"mp4_rot{d}"][0]["rotation"] for d in (90, 180, 270)} == {90, 180, 270}
    assert by_name["mpegts"][0]["start_seconds"] == 0.0  # its stream starts at 1.44 s


def test_fps_takes_the_frame_shown_at_each_output_time(tmp_path):
    """--fps on a variable-rate source (10, 50, 10 fps) takes the frame shown at each output time (10 fps
    parts repeat frames at 20 fps); on a constant-rate source it keeps today's frame-index clips."""
    (tmp_path / "src").mkdir()
    vfr = write_vfr_mp4(tmp_path / "src" / "vfr.mp4")
    cfr = write_cfr(tmp_path / "src" / "cfr.mp4", fps=25, frames=60)
    _, _, samples = ingest([tmp_path / "src"], tmp_path / "ds", fps=20)
    metas = {Path(m["source"]).stem: [] for m, _ in samples}
    for meta, data in samples:
        metas[Path(meta["source"]).stem].append(meta)
        check_times(meta, data, (vfr if "vfr" in meta["source"] else cfr).times)
    assert [m["start_seconds"] for m in metas["vfr"]] == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.4])
    assert all(m["fps"] == 20 and m["key"].split("_")[1].startswith("t") for m in metas["vfr"])
    # constant rate: frame steps of 1.25 source frames from frame starts, keys by start frame, as before
    assert [m["start_frame"] for m in metas["cfr"]] == [0, 10, 20, 30, 40, 50]
    assert all(
        m["frame_step"] == 1.25 and m["key"].endswith(f"_{m['start_frame']:09d}") for m in metas["cfr"]
    )


COLOUR_TOLERANCE = (
    7.5  # of 255, per patch mean: 4:2:0 chroma, the colour pass at 64 px, VP9 at CRF 32 (measured: <= 6.4)
)


@pytest.fixture(scope="module")
def colour_clips(tmp_path_factory):
    src = tmp_path_factory.mktemp("colour")
    written = {name: make(src / name) for name, make in COLOUR_SOURCES.items()}
    _, _, samples = ingest([src], tmp_path_factory.mktemp("ds") / "ds", num_frames=4, size=64)
    return written, samples


def test_colour_range_matrix_and_depth_are_honoured(colour_clips):
    """Each patch of every clip has the colour the source means (its range, matrix and bit depth
    honoured), in the one declared output: BT.601 matrix, limited range, 8-bit 4:2:0, tagged."""
    written, samples = colour_clips
    assert {Path(m["source"]).name for m, _ in samples} == set(COLOUR_SOURCES)
    for meta, data in samples:
        w = written[Path(meta["source"]).name]
        frame = decode_clip(data, 4)[0]
        got = np.array(read_patches(frame, w.patches))
        want = np.array([p.rgb for p in w.patches], dtype=float)
        worst = np.abs(got - want).max()
        assert worst <= COLOUR_TOLERANCE, (meta["source"], worst)
        assert meta["colour"] == {"matrix": "bt601", "range": "limited", "bit_depth": 8, "chroma": "4:2:0"}
        with av.open(io.BytesIO(data)) as c:
            f = next(c.decode(video=0))
            assert (f.format.name, f.color_range, f.colorspace) == ("yuv420p", 1, 6)
    source = {Path(m["source"]).name: m["source_colour"] for m, _ in samples}
    assert source["full_mjpeg.avi"]["range"] == source["full_h264.mp4"]["range"] == "full"
    assert source["hevc10_bt2020.mp4"] == {
        "matrix": "bt2020",
        "matrix_tagged": True,
        "range": "limited",
        "bit_depth": 10,
    }
    assert source["bt709.mp4"]["matrix"] == "bt709" and source["bt601.mp4"]["matrix"] == "smpte170m"


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="Debian's ffmpeg is not installed")
def test_a_rotation_written_by_ffmpeg_comes_out_upright(tmp_path):
    """Debian's ffmpeg writes the display matrix (as phones do); the clips come out upright."""
    (tmp_path / "src").mkdir()
    w = write_rotated(tmp_path / "src" / "phone.mp4", 90, via="ffmpeg")
    _, _, samples = ingest([tmp_path / "src"], tmp_path / "ds")
    assert samples and all(m["rotation"] == 90 for m, _ in samples)
    for meta, data in samples:
        check_times(meta, data, w.times)


def test_segments_of_one_file(tmp_path, monkeypatch):
    """Manifest rows with start/end (seconds) or start_frame/end_frame: clips come from the window
    only, with the row's label; the split is the source video's; the file is decoded once per shard."""
    (tmp_path / "v").mkdir()
    cfr = write_cfr(tmp_path / "v" / "long.mp4", fps=25, frames=100)  # 4 s
    vfr = write_vfr_mp4(tmp_path / "v" / "vfr.mp4")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label,start,end,start_frame,end_frame\n"
        "v/long.mp4,wave,0.5,1.9,,\n"
        "v/long.mp4,clap,2,,,\n"
        "v/long.mp4,tiny,3.9,4,,\n"  # 0.1 s: too short for an 8-frame clip
        "v/vfr.mp4,jump,,,5,40\n"
    )
    calls = []
    cut = shards.cut_clips
    monkeypatch.setattr(
        shards, "cut_clips", lambda src, clips, *a: calls.append(len(clips)) or cut(src, clips, *a)
    )
    index, errors, samples = ingest([manifest], tmp_path / "ds")
    assert calls == [len([m for m, _ in samples if m["source"].endswith("long.mp4")]), 3]  # once per file
    by_label = {}
    for meta, data in samples:
        by_label.setdefault(meta["label"], []).append(meta)
        check_times(meta, data, (vfr if "vfr" in meta["source"] else cfr).times)
    # the frames whose time is in [0.5, 1.9): 13..47, 8-frame clips from 13
    assert [m["start_seconds"] for m in by_label["wave"]] == [0.52, 0.84, 1.16, 1.48]
    assert [m["start_seconds"] for m in by_label["clap"]] == [2.0, 2.32, 2.64, 2.96, 3.28, 3.6]
    assert all(m["start_seconds"] + 7 / 25 < 4.0 for m in by_label["clap"])
    jump = by_label["jump"]  # frames 5..39 of the VFR file: 0.5 s to 2.1 s
    assert jump and all(vfr.times[5] - 1e-6 <= m["start_seconds"] for m in jump)
    assert all(m["start_seconds"] + 7 / m["fps"] < vfr.times[40] for m in jump)
    assert len({m["key"] for m, _ in samples}) == len(samples)
    assert len({m["split"] for m in by_label["wave"] + by_label["clap"]}) == 1  # one file, one split
    (short,) = [e for e in errors if e["reason"] == "too-short"]
    assert short["segment"] == [3.9, 4.0, "s"] and short["source_frames"] == 2  # frames 98, 99
    assert index["labels"]["classes"] == ["clap", "jump", "wave"]


@pytest.mark.skipif(importlib.util.find_spec("nvidia") is None, reason="nvidia-dali is not installed")
def test_the_three_readers_of_clips_agree(colour_clips):
    """DALI's decoder (the trainer), the PyAV loader and ingest tokens' decode_clip see the same pixels:
    within 1 of 255 at the 99th percentile (the goal); measured: identical on these clips and the sample
    videos' (docs/ingest.md, Colour)."""
    import torch

    from train.decoders import DaliClipDecoder, PyAVClipDecoder

    _, samples = colour_clips
    clips = [data for _, data in samples]
    dali, _ = DaliClipDecoder(4, 64, len(clips), device="cpu", uint8=True).decode(clips)
    pyav, _ = PyAVClipDecoder(4, 64, uint8=True).decode(clips)
    tokens = torch.from_numpy(np.stack([decode_clip(c, 4) for c in clips]))
    for other in (pyav, tokens):
        diff = (dali.int() - other.int()).abs().float()
        assert torch.quantile(diff.flatten()[::3], 0.99) <= 1 and diff.max() <= 1


def test_the_summary_says_what_was_honoured(tmp_path):
    """`lvmae ingest clips` says which sources were sampled by time, turned upright or passed over."""
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    write_vfr_mp4(src / "vfr.mp4")
    write_rotated(src / "phone.mp4", 270)
    (src / "README.md").write_text("about this corpus\n")
    cmd = [sys.executable, "-m", "lvmae_cli", "ingest", "clips", str(src), "--out", str(tmp_path / "ds")]
    run = subprocess.run([*cmd, "--frames", "8", "--size", "32", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "1 variable-rate sources sampled by presentation time" in run.stdout
    assert "1 rotated sources turned upright" in run.stdout and "passed over: 1 other-file" in run.stdout
