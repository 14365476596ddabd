"""Typed configuration of `lvmae ingest` (OmegaConf structured schema)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lvmae.config import ConfigError

CODECS = ("vp9", "h264")


@dataclass
class ClipSpec:
    """The clips every source is cut into."""

    num_frames: int = 128
    size: int = 224  # short side scaled to this, then centre-cropped to size x size
    fps: float | None = None  # target frame rate; None keeps the source's rate (with frame_stride)
    frame_stride: int = 1  # source frames per clip frame, when fps is None
    clip_stride: int | None = None  # clip frames between clip starts; None = num_frames (no overlap)
    codec: str = "vp9"  # every DALI backend decodes VP9; h264 needs the GPU decoder

    @property
    def stride(self) -> int:
        return self.clip_stride if self.clip_stride is not None else self.num_frames

    def validate(self, prefix: str = "clip") -> None:
        def check(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{prefix}.{key}: {msg}")

        check(self.num_frames >= 1, "num_frames", "must be positive")
        check(self.size >= 16 and self.size % 2 == 0, "size", "must be an even number >= 16")
        check(self.fps is None or self.fps > 0, "fps", "must be positive")
        check(self.frame_stride >= 1, "frame_stride", "must be >= 1")
        check(self.clip_stride is None or self.clip_stride >= 1, "clip_stride", "must be >= 1")
        check(self.codec in CODECS, "codec", f"must be one of {', '.join(CODECS)}; got {self.codec!r}")


@dataclass
class IngestConfig:
    clip: ClipSpec = field(default_factory=ClipSpec)
    shard_bytes: int = 1 << 30  # target shard size; turned into a clip count from an estimate
    shard_clips: int | None = None  # exact clips per shard (overrides shard_bytes)
    workers: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    strict: bool = False
    # Splits by source video (ingest.labels): a manifest's `split` column, else a seeded draw per label.
    split_seed: int = 0
    val_share: float = 0.1
    test_share: float = 0.1
    storage_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        self.clip.validate()
        if self.shard_bytes < 1:
            raise ConfigError("shard_bytes: must be positive")
        if self.shard_clips is not None and self.shard_clips < 1:
            raise ConfigError("shard_clips: must be >= 1")
        if self.workers < 1:
            raise ConfigError("workers: must be >= 1")
        if min(self.val_share, self.test_share) < 0 or self.val_share + self.test_share >= 1:
            raise ConfigError(
                f"val_share, test_share: need shares >= 0 that leave some training data; got "
                f"{self.val_share}, {self.test_share}"
            )
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            raise ConfigError(f"node_rank: {self.node_rank} is not in [0, num_nodes={self.num_nodes})")
