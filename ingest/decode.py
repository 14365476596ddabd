"""The one definition of how clip bytes become model input (ingest tokens and the loader share it).

decode_clip: encoded clip -> (T, H, W, 3) uint8 RGB, decoded with PyAV, its colour conversion kept
single-threaded (much faster per frame, STACK.md). to_model_input: uint8 clips -> float (B, 3, T, H, W)
in [0, 1]. Ship uint8 across processes and convert late: a 128-frame float clip is 77 MB.
"""

from __future__ import annotations

import io

import numpy as np
import torch


class CorruptClip(ValueError):
    """Clip bytes that do not decode to the expected frames."""


def decode_clip(data: bytes, num_frames: int | None = None) -> np.ndarray:
    """-> (T, H, W, 3) uint8. Raises CorruptClip if decoding fails or yields the wrong frame count."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24", threads=1) for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as err:
        raise CorruptClip(f"cannot decode clip: {err}") from None
    if not frames or (num_frames is not None and len(frames) != num_frames):
        raise CorruptClip(f"clip decoded to {len(frames)} frames, expected {num_frames}")
    return np.stack(frames)


def to_model_input(clips: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32 in [0, 1] on `device` (converted there)."""
    x = torch.as_tensor(clips).to(device, non_blocking=True)
    return x.permute(0, 4, 1, 2, 3).float().div_(255.0)
