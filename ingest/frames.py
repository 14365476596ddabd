"""Decoding a window of frames from a video file with PyAV, resized and centre-cropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def read_frames(path: str | Path, num_frames: int, start: int = 0) -> np.ndarray:
    """Frames [start, start + num_frames) as (T, H, W, 3) uint8 RGB. ValueError if the video is too short."""
    import av

    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == num_frames:
                    break
    if len(frames) < num_frames:
        raise ValueError(f"{path}: needs {start + num_frames} frames, has {start + len(frames)}")
    return np.stack(frames)


def resize_center_crop(frames: np.ndarray, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, size, size) float32 in [0, 1]: short side to `size`, centre crop."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (T, 3, H, W)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(
        x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear", antialias=True
    )
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return x.permute(1, 0, 2, 3).contiguous().clamp_(0, 1)


def load_clip(path: str | Path, num_frames: int, size: int, start: int = 0) -> torch.Tensor:
    """A training-ready clip: (3, T, size, size) float32 in [0, 1]."""
    return resize_center_crop(read_frames(path, num_frames, start), size)
