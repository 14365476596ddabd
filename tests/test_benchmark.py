"""The procedural long-context benchmark (ingest.synth): determinism, balance, decodable H.264 files,
oracle solvability from the whole clip after coding, the long-context property, ingest and the CLI."""

from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from ingest.synth import TASKS, event_length, make_clip, write_benchmark
from lvmae_cli.main import main

T, SIZE, NUM = 128, 32, 8


def decode(path: Path) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a video file."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def colour_mask(video: np.ndarray, colour: str, hi: int = 170, lo: int = 80) -> np.ndarray:
    """(T, H, W) bool: pixels of a saturated `colour` (channels on above `hi`, off below `lo`)."""
    on = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "white": (1, 1, 1)}
    v = video.astype(int)
    return np.all([(v[..., c] > hi) if bit else (v[..., c] < lo) for c, bit in enumerate(on[colour])], 0)


def event_frames(video: np.ndarray, colour: str, side_share: float) -> np.ndarray:
    """(n,) frames where at least half of an event square's area shows `colour`."""
    side = round(side_share * video.shape[1])
    return np.flatnonzero(colour_mask(video, colour).sum((1, 2)) >= side * side / 2)


def runs(frames: np.ndarray) -> int:
    """Number of runs of consecutive frame indices."""
    return 0 if len(frames) == 0 else 1 + int((np.diff(frames) > 1).sum())


def square_x(video: np.ndarray, side_share: float = 0.3) -> np.ndarray:
    """(T,) left edge of the yellow square: the side-wide column band holding most yellow pixels."""
    side = round(side_share * video.shape[1])
    cols = colour_mask(video, "yellow", hi=150, lo=100).sum(1)  # (T, W)
    band = np.cumsum(np.pad(cols, ((0, 0), (1, 0))), 1)
    return (band[:, side:] - band[:, :-side]).argmax(1)


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> dict[str, Path]:
    """task -> manifest of NUM videos of T frames."""
    root = tmp_path_factory.mktemp("bench")
    return {task: write_benchmark(root / task, task, NUM, T, SIZE, seed=1, progress=False) for task in TASKS}


def test_make_clip_is_deterministic_and_seeded():
    for task in TASKS:
        a = make_clip(task, 1, seed=5, num_frames=64, size=SIZE)
        assert a.shape == (64, SIZE, SIZE, 3) and a.dtype == np.uint8
        assert np.array_equal(a, make_clip(task, 1, seed=5, num_frames=64, size=SIZE))
        assert not np.array_equal(a, make_clip(task, 1, seed=6, num_frames=64, size=SIZE))
        assert not np.array_equal(a, make_clip(task, 0, seed=5, num_frames=64, size=SIZE))


def test_bad_arguments_give_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_clip("nope", 0, 0)
    with pytest.raises(ValueError, match="size must be an even number >= 16"):
        make_clip("order", 0, 0, size=15)
    with pytest.raises(ValueError, match="frames must be >= 32 for the drift task"):
        make_clip("drift", 0, 0, num_frames=16)
    with pytest.raises(ValueError, match="label must be in"):
        make_clip("count", 4, 0)
    with pytest.raises(ValueError, match="num must be >= 1"):
        write_benchmark(tmp_path, "order", 0)
    assert make_clip("color", 3, 0, num_frames=1).shape == (1, 32, 32, 3)  # the control: any length


@pytest.mark.parametrize("task", list(TASKS))
def test_manifest_is_balanced_and_videos_decode(benchmarks, task):
    manifest = benchmarks[task]
    rows = read_manifest(manifest)
    classes = TASKS[task].classes
    assert [r["path"] for r in rows] == [f"videos/{task}-{i:05d}.mp4" for i in range(NUM)]
    counts = Counter(r["label"] for r in rows)
    assert set(counts) <= set(classes) and max(counts.values()) - min(counts.values()) <= 1
    assert len(counts) == min(NUM, len(classes))
    for r in rows:
        assert decode(manifest.parent / r["path"]).shape == (T, SIZE, SIZE, 3)


def test_rerun_resumes_and_refuses_other_settings(benchmarks):
    manifest = benchmarks["count"]
    video = manifest.parent / "videos" / "count-00003.mp4"
    before, stamp = video.read_bytes(), video.stat().st_mtime_ns
    other = manifest.parent / "videos" / "count-00004.mp4"
    other_bytes = other.read_bytes()
    other.unlink()
    assert write_benchmark(manifest.parent, "count", NUM, T, SIZE, seed=1, progress=False) == manifest
    assert video.stat().st_mtime_ns == stamp and video.read_bytes() == before  # kept
    assert other.read_bytes() == other_bytes  # rewritten identically
    assert not list(manifest.parent.rglob(".*"))  # no temporary files left
    with pytest.raises(ValueError, match="other settings"):
        write_benchmark(manifest.parent, "count", NUM, T, SIZE, seed=2, progress=False)


def decoded(manifest: Path) -> list[tuple[np.ndarray, str]]:
    return [(decode(manifest.parent / r["path"]), r["label"]) for r in read_manifest(manifest)]


def test_order_oracle_after_coding(benchmarks):
    for video, label in decoded(benchmarks["order"]):
        red, blue = event_frames(video, "red", 0.35), event_frames(video, "blue", 0.35)
        assert runs(red) == runs(blue) == 1 and len(red) == len(blue) == event_length(T)
        assert label == ("red_then_blue" if red[0] < blue[0] else "blue_then_red")


def test_count_oracle_after_coding(benchmarks):
    for video, label in decoded(benchmarks["count"]):
        flashes = event_frames(video, "white", 0.25)
        assert runs(flashes) == int(label)
        assert len(flashes) == int(label) * event_length(T)


def test_drift_oracle_after_coding(benchmarks):
    for video, label in decoded(benchmarks["drift"]):
        x = square_x(video)
        assert np.sign(x[-1] - x[0]) == (1 if label == "right" else -1)


def test_color_oracle_after_coding(benchmarks):
    for video, label in decoded(benchmarks["color"]):
        counts = [colour_mask(video, c, hi=150, lo=100).sum() for c in TASKS["color"].classes]
        assert TASKS["color"].classes[int(np.argmax(counts))] == label


def test_order_events_never_share_a_quarter_window():
    """On the raw arrays: the events are L frames each and at least T // 4 frames apart, for any T."""
    for num_frames in (32, 64, 128, 130):
        window, length = num_frames // 4, event_length(num_frames)
        for seed in range(20):
            video = make_clip("order", seed % 2, seed, num_frames, SIZE)
            red = np.flatnonzero((video == [255, 0, 0]).all(-1).any((1, 2)))
            blue = np.flatnonzero((video == [0, 0, 255]).all(-1).any((1, 2)))
            first, second = (red, blue) if seed % 2 == 0 else (blue, red)
            assert len(first) == len(second) == length
            assert first[-1] < window and second[0] >= num_frames - window
            assert second[0] - first[-1] >= window  # no window of T // 4 frames holds both


def test_the_two_labels_of_one_seed_differ_only_where_the_flashes_are():
    """What bench/flash_priority.py rests on: one scene, the class evidence swapped; the pixels that
    differ are the red and the blue squares, nowhere else."""
    for seed in range(5):
        a, b = (make_clip("order", label, seed, 128, SIZE) for label in (0, 1))
        differ = np.any(a != b, axis=-1)
        painted = ((a == [255, 0, 0]) | (a == [0, 0, 255])).all(-1)
        assert np.array_equal(differ, painted) and differ.any()
        frames = np.flatnonzero(differ.any((1, 2)))
        assert len(frames) == 2 * event_length(128)


def test_count_flashes_are_separate_at_the_shortest_length():
    for flashes in (2, 3, 4, 5):
        for seed in range(10):
            video = make_clip("count", flashes - 2, seed, 32, SIZE)
            assert runs(event_frames(video, "white", 0.25)) == flashes


def test_drift_needs_long_context():
    """On the raw arrays, over 40 clips: the sign of the displacement over the whole clip always gives the
    class; over T // 4-frame windows the oscillation hides it much of the time."""
    window, clip_hits, window_hits, windows = T // 4, 0, 0, 0
    for seed in range(40):
        label = seed % 2
        x = square_x(make_clip("drift", label, seed, T, SIZE))
        sign = 1 if label == 1 else -1
        clip_hits += np.sign(x[-1] - x[0]) == sign
        moves = x[window - 1 :] - x[: T - window + 1]  # every window's displacement
        window_hits += int((np.sign(moves) == sign).sum())
        windows += len(moves)
    clip_agreement, window_agreement = clip_hits / 40, window_hits / windows
    print(
        f"drift sign agreement: whole clip {clip_agreement:.3f}, {window}-frame windows {window_agreement:.3f}"
    )
    assert clip_agreement == 1.0 and window_agreement < 0.75


def test_manifest_goes_through_ingest(benchmarks, tmp_path):
    from ingest.clips import ingest_clips
    from ingest.config import ClipSpec, IngestConfig

    manifest = benchmarks["order"]
    labels = {r["path"]: r["label"] for r in read_manifest(manifest)}
    out = tmp_path / "data"
    cfg = IngestConfig(clip=ClipSpec(num_frames=T, size=SIZE), shard_clips=4)
    summary = ingest_clips([str(manifest)], str(out), cfg, progress=False)
    assert (summary.sources, summary.clips_planned, summary.num_samples) == (NUM, NUM, NUM)
    seen = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    seen[meta["source"].rsplit("/", 1)[-1]] = meta["label"]
    assert seen == {path.split("/")[-1]: label for path, label in labels.items()}


def test_cli_writes_a_benchmark_and_says_what_next(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["ingest", "synth", str(out), "--task", "count", "--num", "4", "--frames", "64", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert str(out / "manifest.csv") in text
    assert f"lvmae ingest clips {out / 'manifest.csv'} --out DATA --frames 64 --size 32" in text
    rows = read_manifest(out / "manifest.csv")
    assert len(rows) == 4 and sorted(r["label"] for r in rows) == ["2", "3", "4", "5"]
    assert decode(out / rows[0]["path"]).shape == (64, 32, 32, 3)

    assert main(["ingest", "synth", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(t.name in listing and ", ".join(t.classes) in listing for t in TASKS.values())

    with pytest.raises(SystemExit) as bad:
        main(["ingest", "synth", str(out), "--task", "nope", "--num", "4"])
    assert bad.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert (
        main(["ingest", "synth", str(tmp_path / "x"), "--task", "order", "--num", "4", "--size", "15"]) == 2
    )
    assert (
        capsys.readouterr().err.strip() == "lvmae ingest: error: size must be an even number >= 16 (got 15)"
    )
    assert main(["ingest", "synth", str(tmp_path / "y")]) == 2
    assert "needs OUT, --task and --num" in capsys.readouterr().err


def test_encoded_size_is_small(benchmarks):
    """H.264 at high quality stays small at 32x32 (a sanity bound on what a benchmark costs on disk)."""
    sizes = [p.stat().st_size for p in (benchmarks["color"].parent / "videos").glob("*.mp4")]
    assert max(sizes) < 200_000, sizes


def test_videos_are_yuv420p_h264(benchmarks):
    path = benchmarks["drift"].parent / "videos" / "drift-00000.mp4"
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (SIZE, SIZE)
