"""Planning an ingest (pure functions): which clips each video yields and which shard holds each clip.

The plan is a deterministic function of the probed corpus and the clip spec, so every worker and every
node computes the same plan, a re-run after an interruption finds the same shards, and work can be split
by shard with no coordination.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class VideoInfo:
    """What probing a source video found."""

    uri: str
    frames: int  # frame count from the container (exact or estimated from duration * fps)
    fps: float
    width: int
    height: int
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


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

    @property
    def out_fps(self) -> float:
        return self.src_fps / self.step

    def frame_indices(self) -> list[int]:
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


def clip_starts(total_frames: int, num_frames: int, step: float, clip_stride: int) -> list[int]:
    """First source frame of every clip that fits: clips start every `clip_stride` OUTPUT frames.

    A clip fits when its last sampled frame is < total_frames. clip_stride < num_frames overlaps clips.
    """
    span = frame_indices(0, num_frames, step)[-1]
    starts, k = [], 0
    while True:
        start = math.floor(k * clip_stride * step + 0.5)
        if start + span >= total_frames:
            return starts
        starts.append(start)
        k += 1


def sample_key(uri: str, start: int) -> str:
    """Stable, global sample id: a hash of the source URI plus the start frame (no dots: webdataset)."""
    digest = hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]
    return f"{digest}_{start:09d}"


def plan_clips(
    videos: list[VideoInfo], num_frames: int, target_fps: float | None, frame_stride: int, clip_stride: int
) -> list[Clip]:
    """Every clip of every video, in corpus order (videos sorted by URI by the caller), starts ascending."""
    clips = []
    for v in videos:
        step = sampling_step(v.fps, target_fps, frame_stride)
        for start in clip_starts(v.frames, num_frames, step, clip_stride):
            clips.append(
                Clip(
                    sample_key(v.uri, start),
                    v.uri,
                    start,
                    step,
                    num_frames,
                    v.fps,
                    v.width,
                    v.height,
                    v.label,
                    v.meta.get("split"),
                )
            )
    return clips


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
