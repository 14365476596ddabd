"""Planning an ingest (pure functions): which clips each video yields and which shard holds each clip.

The plan is a deterministic function of the probed corpus and the clip spec, so every worker and every
node computes the same plan, a re-run after an interruption finds the same shards, and work can be split
by shard with no coordination.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

TIME_EPS = 1e-6  # seconds: a frame shown at t is the last one with time <= t + TIME_EPS


@dataclass(frozen=True)
class Look:
    """How a source's pixels are to be read: its rotation and colour (ingest.probe reads them)."""

    rotation: int = 0  # degrees counter-clockwise that make the stored picture upright: 0, 90, 180, 270
    matrix: str = "bt470bg"  # YUV matrix, as the scale filter names it (bt470bg / smpte170m = BT.601)
    matrix_tagged: bool = True  # False: the file has no matrix tag, `matrix` is the convention by size
    full_range: bool = False
    bit_depth: int = 8
    transfer: str = ""  # an HDR transfer (smpte2084, arib-std-b67) where the file has one
    pix_fmt: str = "yuv420p"


@dataclass(frozen=True)
class Segment:
    """A window of a source, from a manifest row: [start, end) in seconds or in source frames."""

    start: float | None = None
    end: float | None = None
    unit: str = "s"  # "s" or "frame"

    def tag(self) -> str:
        """A media-fragment suffix that tells segments of one file apart (in sample keys)."""
        lo, hi = ("" if v is None else f"{v:g}" for v in (self.start, self.end))
        return f"#{'t' if self.unit == 's' else 'frame'}={lo},{hi}"


@dataclass(frozen=True)
class VideoInfo:
    """What probing a source video found (ingest.probe)."""

    uri: str
    frames: int  # frame count: the header's where it can be trusted, else counted from the stream
    fps: float  # the average rate for a variable-rate stream
    width: int  # as stored (before rotation)
    height: int
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    look: Look = field(default_factory=Look)
    frame_times: tuple[float, ...] | None = field(default=None, repr=False)  # VFR: seconds from frame 0
    frames_counted: bool = False  # the count comes from the stream's packets, not the header
    segment: Segment | None = None
    damage: str | None = None  # the file ends before its header says (truncated): its whole clips are kept
    container: str = ""  # libav's (first) format name: mov, matroska, avi, mpegts, gif, ...
    codec: str = ""  # the video stream's codec: h264, hevc, vp9, ...

    @property
    def variable_rate(self) -> bool:
        return self.frame_times is not None

    @property
    def duration(self) -> float:
        if self.frame_times:
            return self.frame_times[-1] + 1 / self.fps
        return self.frames / self.fps

    @property
    def display_size(self) -> tuple[int, int]:
        turned = self.look.rotation in (90, 270)
        return (self.height, self.width) if turned else (self.width, self.height)


@dataclass(frozen=True)
class Clip:
    """One training sample: `num_frames` source frames sampled every `step` frames from `start`."""

    key: str
    uri: str
    start: int  # first source frame
    step: float  # source frames per output frame (1.0 = every frame)
    num_frames: int
    src_fps: float
    src_width: int
    src_height: int
    label: str | None = None
    split: str | None = None  # train / val / test, the source video's (ingest.labels)
    look: Look = field(default_factory=Look)
    # Sampled by time (a variable-rate source): the source frame of each output frame, the clip's start
    # time and its output rate. None for a constant-rate source: start + round(i * step).
    indices: tuple[int, ...] | None = None
    start_time: float | None = None
    rate: float | None = None
    segment: Segment | None = None

    @property
    def out_fps(self) -> float:
        return self.rate if self.rate is not None else self.src_fps / self.step

    @property
    def start_seconds(self) -> float:
        return self.start_time if self.start_time is not None else self.start / self.src_fps

    def frame_indices(self) -> list[int]:
        if self.indices is not None:
            return list(self.indices)
        return frame_indices(self.start, self.num_frames, self.step)

    @property
    def last_frame(self) -> int:
        return self.frame_indices()[-1]


def frame_indices(start: int, num_frames: int, step: float) -> list[int]:
    """Source frame numbers of a clip: start + round(i * step), i < num_frames (strictly increasing)."""
    return [start + math.floor(i * step + 0.5) for i in range(num_frames)]


def sampling_step(src_fps: float, target_fps: float | None, frame_stride: int) -> float:
    """Source frames per output frame: from a target frame rate, else the fixed stride.

    A target rate above the source's is capped at the source's: frames are never duplicated.
    """
    if target_fps is not None:
        return max(1.0, src_fps / target_fps)
    return float(frame_stride)


def clip_span(num_frames: int, step: float) -> int:
    """Source frames one clip covers, its first to its last sampled frame: a source needs at least this many."""
    return frame_indices(0, num_frames, step)[-1] + 1


def sampled_frames(total_frames: int, num_frames: int, step: float) -> int:
    """How many of a clip's `num_frames` frames, sampled every `step` from the first, a source of
    `total_frames` frames holds (num_frames when a clip fits)."""
    return sum(1 for i in frame_indices(0, num_frames, step) if i < total_frames)


def clip_starts(
    total_frames: int, num_frames: int, step: float, clip_stride: int, first: int = 0
) -> list[int]:
    """First source frame of every clip that fits: clips start every `clip_stride` OUTPUT frames from
    `first`. A clip fits when its last sampled frame is < total_frames. clip_stride < num_frames overlaps."""
    span = frame_indices(0, num_frames, step)[-1]
    starts, k = [], 0
    while True:
        start = first + math.floor(k * clip_stride * step + 0.5)
        if start + span >= total_frames:
            return starts
        starts.append(start)
        k += 1


def sample_key(uri: str, start: int, time_ms: int | None = None) -> str:
    """Stable, global sample id: a hash of the source URI (with its segment, if any) plus the start frame,
    or `t` and the start in milliseconds for a clip sampled by time (no dots: webdataset)."""
    digest = hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]
    return f"{digest}_{start:09d}" if time_ms is None else f"{digest}_t{time_ms:09d}"


def frame_window(v: VideoInfo) -> tuple[int, int]:
    """[first, end) source frames of a constant-rate source's segment (all of it without one)."""
    seg = v.segment
    if seg is None:
        return 0, v.frames
    if seg.unit == "frame":
        lo, hi = int(seg.start or 0), v.frames if seg.end is None else int(seg.end)
    else:  # frame i is shown from i / fps: the frames whose time is in [start, end)
        lo = math.ceil((seg.start or 0) * v.fps - TIME_EPS)
        hi = v.frames if seg.end is None else math.ceil(seg.end * v.fps - TIME_EPS)
    return max(0, lo), min(v.frames, hi)


def time_window(v: VideoInfo) -> tuple[float, float]:
    """[start, end) seconds of a variable-rate source's segment; its end is the last frame's end."""
    times = v.frame_times or ()
    end = v.duration
    seg = v.segment
    if seg is None:
        return 0.0, end
    if seg.unit == "frame":
        lo = times[min(int(seg.start or 0), len(times) - 1)]
        hi = end if seg.end is None or int(seg.end) >= len(times) else times[int(seg.end)]
        return lo, hi
    return max(0.0, seg.start or 0.0), end if seg.end is None else min(end, seg.end)


def time_samples(
    v: VideoInfo, num_frames: int, rate: float, clip_stride: int
) -> list[tuple[float, list[int]]]:
    """(start time, source frame of each output frame) of every clip of a variable-rate source: output
    frame i of a clip shows the source frame shown at start + i / rate (the last one at or before it)."""
    times = v.frame_times or ()
    lo, hi = time_window(v)
    out, k = [], 0
    while True:
        t0 = lo + k * clip_stride / rate
        if t0 + (num_frames - 1) / rate >= hi - TIME_EPS:
            return out
        out.append(
            (t0, [bisect.bisect_right(times, t0 + i / rate + TIME_EPS) - 1 for i in range(num_frames)])
        )
        k += 1


def clips_of(
    v: VideoInfo, num_frames: int, target_fps: float | None, frame_stride: int, clip_stride: int
) -> list[Clip]:
    """Every clip of one video (or of its segment), starts ascending."""
    uri = v.uri if v.segment is None else v.uri + v.segment.tag()
    common = dict(label=v.label, split=v.meta.get("split"), look=v.look, segment=v.segment)
    if v.frame_times is None:
        step = sampling_step(v.fps, target_fps, frame_stride)
        lo, hi = frame_window(v)
        return [
            Clip(sample_key(uri, s), v.uri, s, step, num_frames, v.fps, v.width, v.height, **common)
            for s in clip_starts(hi, num_frames, step, clip_stride, first=lo)
        ]
    rate = target_fps or v.fps / frame_stride
    return [
        Clip(
            sample_key(uri, idx[0], round(t0 * 1000)),
            v.uri,
            idx[0],
            v.fps / rate,
            num_frames,
            v.fps,
            v.width,
            v.height,
            indices=tuple(idx),
            start_time=round(t0, 6),
            rate=rate,
            **common,
        )
        for t0, idx in time_samples(v, num_frames, rate, clip_stride)
    ]


def plan_clips(
    videos: list[VideoInfo], num_frames: int, target_fps: float | None, frame_stride: int, clip_stride: int
) -> list[Clip]:
    """Every clip of every video, in corpus order (videos sorted by URI by the caller), starts ascending."""
    return [c for v in videos for c in clips_of(v, num_frames, target_fps, frame_stride, clip_stride)]


def coverage(v: VideoInfo, num_frames: int, target_fps: float | None, frame_stride: int) -> dict[str, Any]:
    """What a video (or its segment) holds against what one clip needs, in source frames: the counts of
    a too-short record. source_frames: in the window; source_frames_needed: one clip's span (at the
    average rate for a variable-rate source); sampled_frames: the clip frames the window gives."""
    if v.frame_times is None:
        step = sampling_step(v.fps, target_fps, frame_stride)
        lo, hi = frame_window(v)
        return {
            "source_frames": max(0, hi - lo),
            "source_frames_needed": clip_span(num_frames, step),
            "sampled_frames": sampled_frames(max(0, hi - lo), num_frames, step),
            "step": step,
        }
    rate = target_fps or v.fps / frame_stride
    lo, hi = time_window(v)
    inside = sum(1 for t in v.frame_times if lo - TIME_EPS <= t < hi - TIME_EPS)
    return {
        "source_frames": inside,
        "source_frames_needed": math.floor((num_frames - 1) / rate * v.fps) + 1,
        "sampled_frames": min(num_frames, max(0, math.ceil((hi - lo) * rate - TIME_EPS))),
        "step": v.fps / rate,
    }


def estimate_clip_bytes(num_frames: int, size: int, bits_per_pixel: float = 0.2) -> int:
    """Rough compressed size of one clip; only used to turn a shard byte target into a clip count."""
    return max(1, int(num_frames * size * size * bits_per_pixel / 8))


def group_into_shards(clips: list[Clip], clips_per_shard: int) -> list[list[Clip]]:
    """Consecutive runs of `clips_per_shard` clips (the last may be shorter)."""
    if clips_per_shard < 1:
        raise ValueError("clips_per_shard must be >= 1")
    return [clips[i : i + clips_per_shard] for i in range(0, len(clips), clips_per_shard)]


def shards_of_node(num_shards: int, num_nodes: int, node_rank: int) -> list[int]:
    """The shard numbers node `node_rank` of `num_nodes` writes: round-robin, disjoint, covering."""
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"node rank {node_rank} is not in [0, {num_nodes})")
    return list(range(node_rank, num_shards, num_nodes))


def plan_digest(shards: list[list[Clip]], spec: dict[str, Any]) -> str:
    """Fingerprint of a plan: resuming with a different corpus or spec is refused, not silently mixed."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for shard in shards:
        h.update(json.dumps([asdict(c) for c in shard], sort_keys=True).encode())
        h.update(b"|")
    return h.hexdigest()[:16]
