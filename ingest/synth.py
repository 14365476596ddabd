"""Procedural benchmark videos for long-temporal-context classification (`lvmae ingest synth`).

Every clip has the same distractor-rich background whatever its task and class: a still texture
(ingest.scenes.texture), 1-2 untinted textured squares bouncing across it and 0-1 flickering patches.
On top of it each task paints what decides the class:

- `order` (long context): a solid red and a solid blue square flash for L = max(2, T // 32) frames each,
  one in the first quarter of the clip and the other in the last; the class is which comes first. Both
  start ranges are the same length at the same offset inside their quarter, so no window of T // 4
  frames sees both events, and what one such window sees has the same distribution for both classes.
- `count` (long context): a white square flashes k = 2..5 times (L frames each) at one spot, evenly spread
  over the clip (period T / k, random phase, +-1 frame of jitter). A window sees about T / (4 k) flashes,
  so it can partly estimate the rate: this is the weakest of the long-context tasks.
- `drift` (long context): a yellow-tinted square drifts 0.3 of the frame side left or right over the clip,
  plus an oscillation (2-3 sines of whole-clip periods T/2, T/3, T/5, T/6; total amplitude 0.15 of the
  side) that dominates the motion within any T // 4 window. Whole cycles cancel over the clip, so the
  clip's net displacement is the drift; the path is placed at random where it stays in the frame.
- `color` (short-context control): a square tinted 70% with the class colour bounces across the clip;
  any single frame solves it.

    clip = make_clip("order", label=0, seed=7)           # (128, 32, 32, 3) uint8
    manifest = write_benchmark("bench/order", "order", num=200)  # videos/*.mp4 + manifest.csv
    # then: lvmae ingest clips bench/order/manifest.csv --out DATA --frames 128 --size 32
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.scenes import SceneSpec, bounce_path, moving_objects_clip, texture
from lvmae.weights import write_text_atomically


@dataclass(frozen=True)
class BenchmarkTask:
    name: str
    classes: tuple[str, ...]
    long_context: bool
    description: str


TASKS: dict[str, BenchmarkTask] = {
    t.name: t
    for t in (
        BenchmarkTask(
            "order",
            ("red_then_blue", "blue_then_red"),
            True,
            "a red and a blue flash, one in the first and one in the last quarter: which comes first",
        ),
        BenchmarkTask(
            "count",
            ("2", "3", "4", "5"),
            True,
            "a white square flashes 2-5 times, evenly over the clip: how many flashes",
        ),
        BenchmarkTask(
            "drift",
            ("left", "right"),
            True,
            "a yellow square oscillates with a slow drift: which way it drifts over the whole clip",
        ),
        BenchmarkTask(
            "color",
            ("red", "green", "blue", "yellow"),
            False,
            "a bouncing square tinted with the class colour (short-context control)",
        ),
    )
}

# The class-independent background: object sizes are fractions of the frame side, speeds frame sides
# travelled over the whole clip (bouncing off the edges).
BACKGROUND = SceneSpec(num_objects=(1, 2), object_size=(0.2, 0.3), speed=(0.8, 1.6), num_flickers=(0, 1))
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
TINT = 0.7  # share of the class colour in a tinted square (the rest: its own texture)
DRIFT = 0.3  # drift task: total drift over the clip, in frame sides
WOBBLE = 0.15  # drift task: total amplitude of the oscillation, in frame sides
WOBBLE_CYCLES = (2, 3, 5, 6)  # drift task: cycles per clip of each sine (not 4 or 8: they cancel in T/4)
MIN_LONG_FRAMES = 32
QP = 10  # H.264 constant quantizer: small coloured events must survive the coding


def event_length(num_frames: int) -> int:
    """Frames an `order` / `count` event lasts: max(2, T // 32)."""
    return max(2, num_frames // 32)


def check_params(task: str, num_frames: int, size: int, num: int = 1) -> BenchmarkTask:
    """The task, or ValueError with one clear message for a bad task / size / frame count / num."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    spec = TASKS[task]
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16 (got {size})")
    low = MIN_LONG_FRAMES if spec.long_context else 1
    if num_frames < low:
        raise ValueError(f"frames must be >= {low} for the {task} task (got {num_frames})")
    if num < 1:
        raise ValueError(f"num must be >= 1 (got {num})")
    return spec


def _side(size: int, share: float) -> int:
    return max(2, round(share * size))


def _square(frames: np.ndarray, t0: int, t1: int, y: int, x: int, side: int, colour: np.ndarray) -> None:
    """Paint a solid (3,) colour square of `side` at (y, x) in frames [t0, t1) of (T, H, W, 3) frames."""
    frames[t0:t1, y : y + side, x : x + side] = colour


def _tinted(rng: np.random.Generator, side: int, size: int, colour: str) -> np.ndarray:
    """(side, side, 3) float: a texture pulled TINT of the way to `colour`."""
    return (1 - TINT) * texture(rng, side, side, side / size) + TINT * np.array(COLOURS[colour])


def _order(frames: np.ndarray, label: int, rng: np.random.Generator) -> None:
    num_frames, size = frames.shape[:2]
    length, quarter, side = event_length(num_frames), num_frames // 4, _side(size, 0.35)
    offsets = rng.integers(0, quarter - length + 1, size=2)  # offset of each event inside its quarter
    starts = (int(offsets[0]), num_frames - quarter + int(offsets[1]))
    colours = ("red", "blue") if label == 0 else ("blue", "red")
    for start, colour in zip(starts, colours):
        y, x = rng.integers(0, size - side + 1, size=2)
        _square(frames, start, start + length, y, x, side, np.array(COLOURS[colour]))


def count_starts(num_frames: int, flashes: int, rng: np.random.Generator) -> np.ndarray:
    """(flashes,) int first frames of evenly spread flashes: period T / k, random phase, +-1 jitter."""
    length, period = event_length(num_frames), num_frames / flashes
    phase = rng.random() * (period - length - 1)
    jitter = rng.integers(-1, 2, size=5)[:flashes]
    starts = np.round(phase + period * np.arange(flashes)).astype(int) + jitter
    return np.clip(starts, 0, num_frames - length)


def _count(frames: np.ndarray, label: int, rng: np.random.Generator) -> None:
    num_frames, size = frames.shape[:2]
    side = _side(size, 0.25)
    y, x = rng.integers(0, size - side + 1, size=2)
    length = event_length(num_frames)
    for start in count_starts(num_frames, label + 2, rng):
        _square(frames, start, start + length, y, x, side, np.array(COLOURS["white"]))


def drift_path(num_frames: int, size: int, side: int, direction: int, rng: np.random.Generator) -> np.ndarray:
    """(T,) float left edge of the drift square: drift of DRIFT * size towards `direction` (-1 or +1)
    plus 2-3 sines of WOBBLE * size in all, placed uniformly where the whole path stays in the frame."""
    t = np.arange(num_frames)
    n_sines = int(rng.integers(2, 4))
    cycles = rng.choice(WOBBLE_CYCLES, size=3, replace=False)
    weights = rng.uniform(0.5, 1.0, size=3)
    weights[n_sines:] = 0
    amps = WOBBLE * size * weights / weights.sum()
    phases = rng.uniform(0, 2 * np.pi, size=3)
    wobble = (amps[:, None] * np.sin(2 * np.pi * cycles[:, None] * t / num_frames + phases[:, None])).sum(0)
    path = direction * DRIFT * size * (t / max(1, num_frames - 1) - 0.5) + wobble
    lo, hi = -path.min(), size - side - path.max()
    return path + rng.uniform(lo, max(lo, hi))


def _drift(frames: np.ndarray, label: int, rng: np.random.Generator) -> None:
    num_frames, size = frames.shape[:2]
    side = _side(size, 0.3)
    patch = _tinted(rng, side, size, "yellow")
    xs = np.clip(np.round(drift_path(num_frames, size, side, 1 if label == 1 else -1, rng)), 0, size - side)
    y = int(rng.integers(0, size - side + 1))
    for f, x in enumerate(xs.astype(int)):
        frames[f, y : y + side, x : x + side] = patch


def _color(frames: np.ndarray, label: int, rng: np.random.Generator) -> None:
    num_frames, size = frames.shape[:2]
    side = _side(size, 0.3)
    patch = _tinted(rng, side, size, TASKS["color"].classes[label])
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(*BACKGROUND.speed) * size
    start = rng.uniform(0, size - side, size=2)
    step = np.array([np.sin(angle), np.cos(angle)]) * dist / max(1, num_frames - 1)
    for f, (y, x) in enumerate(bounce_path(start, step, num_frames, size - side)):
        frames[f, y : y + side, x : x + side] = patch


_PAINTERS: dict[str, Callable[[np.ndarray, int, np.random.Generator], None]] = {
    "order": _order,
    "count": _count,
    "drift": _drift,
    "color": _color,
}


def make_clip(task: str, label: int, seed: int, num_frames: int = 128, size: int = 32) -> np.ndarray:
    """(T, H, W, 3) uint8 clip of class `label` of `task`, deterministic from all the arguments.

    The background depends on (seed, T, size) only and the task's random draws do not depend on the
    label, so one seed with different labels gives the same scene with only the class evidence changed.
    """
    spec = check_params(task, num_frames, size)
    if not 0 <= label < len(spec.classes):
        raise ValueError(f"label must be in [0, {len(spec.classes)}) for the {task} task (got {label})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (got {seed})")
    background_seq, task_seq = np.random.SeedSequence(seed).spawn(2)
    background = moving_objects_clip(int(background_seq.generate_state(1)[0]), num_frames, size, BACKGROUND)
    frames = background.video.astype(np.float64) / 255  # (T, H, W, 3)
    _PAINTERS[task](frames, label, np.random.default_rng(task_seq))
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def encode_video(path: Path, clip: np.ndarray, fps: int = 25) -> None:
    """Write a (T, H, W, 3) uint8 clip to `path` as H.264 (yuv420p, constant QP) in MP4, atomically.

    Byte-identical from run to run: one thread, and a constant quantizer rather than CRF, whose
    floating-point rate control gave other bytes once the process had decoded H.264 (the decoder leaves
    the CPU's floating-point state changed)."""
    import av

    tmp = path.with_name(f".{path.stem}.partial.mp4")
    with av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        stream.options = {"qp": str(QP), "preset": "veryfast", "threads": "1"}
        for frame in clip:
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            out.mux(stream.encode(rgb.reformat(format="yuv420p", threads=1)))
        out.mux(stream.encode(None))
    os.replace(tmp, path)


def benchmark_labels(num: int, num_classes: int, seed: int) -> np.ndarray:
    """(num,) int balanced labels: perm[i] % num_classes for a permutation seeded by `seed`."""
    return np.random.default_rng(np.random.SeedSequence(seed)).permutation(num) % num_classes


def video_seed(seed: int, index: int) -> int:
    """Content seed of benchmark video `index` (a SeedSequence child of `seed`: no overlap with labels)."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0] >> 1)


def _claim(out: Path, settings: dict) -> None:
    """Record the settings in OUT/benchmark.json; ValueError when OUT holds another benchmark."""
    record = out / "benchmark.json"
    if record.exists():
        old = json.loads(record.read_text())
        if old != settings:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
            raise ValueError(f"{out} holds a benchmark made with other settings ({diff}): use another OUT")
        return
    write_text_atomically(record, json.dumps(settings, indent=2) + "\n")


def write_benchmark(
    out: str | Path,
    task: str,
    num: int,
    num_frames: int = 128,
    size: int = 32,
    seed: int = 0,
    fps: int = 25,
    progress: bool = True,
) -> Path:
    """Write OUT/videos/<task>-<i:05d>.mp4 for i < num, then OUT/manifest.csv (path,label). -> manifest.

    Labels are balanced (benchmark_labels); video i shows make_clip(task, label_i, video_seed(seed, i)).
    Resumable: videos already there are kept (each is written atomically), and the manifest comes last.
    """
    from tqdm import tqdm

    spec = check_params(task, num_frames, size, num)
    if seed < 0 or fps < 1:
        raise ValueError(f"seed must be >= 0 and fps >= 1 (got seed {seed}, fps {fps})")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    settings = {"task": task, "frames": num_frames, "size": size, "seed": seed, "fps": fps, "qp": QP}
    _claim(out, settings)
    labels = benchmark_labels(num, len(spec.classes), seed)
    rows = []
    for i in tqdm(range(num), desc=f"synth {task}", unit="video", disable=not progress):
        path = out / "videos" / f"{task}-{i:05d}.mp4"
        if not path.exists():
            encode_video(path, make_clip(task, int(labels[i]), video_seed(seed, i), num_frames, size), fps)
        rows.append((path.relative_to(out).as_posix(), spec.classes[labels[i]]))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("path", "label"))
    writer.writerows(rows)
    manifest = out / "manifest.csv"
    write_text_atomically(manifest, text.getvalue())
    return manifest


def task_table() -> str:
    """One line per task: name, long context or not, classes, description."""
    lines = []
    for t in TASKS.values():
        kind = "long context" if t.long_context else "short (control)"
        lines.append(f"  {t.name:<6} {kind:<16} classes: {', '.join(t.classes)}\n         {t.description}")
    return "\n".join(lines)
