"""The one definition of how clip bytes become model input (ingest tokens and the loader share it).

decode_clip: encoded clip -> (T, H, W, 3) uint8 RGB, decoded with PyAV and converted to RGB exactly as
DALI's video decoder converts (rgb24), so the three readers of clips (DALI loader, PyAV loader, ingest
tokens) see the same pixels: BT.601 matrix whatever the tags say, the tagged range, chroma upsampled
bilinearly (swscale's bilinear + full_chroma_int + accurate_rnd; bit-identical to DALI 2.4 on CPU), the
conversion kept single-threaded (much faster per frame, STACK.md); decode_frames: the same frames as a list, not stacked
(train.decoders converts them straight into its batch). to_model_input: uint8 clips -> float
(B, 3, T, H, W) in [0, 1]. Ship uint8 across processes and convert late: a 128-frame float clip is 77 MB.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
import torch

# swscale flags: SWS_BILINEAR | SWS_FULL_CHR_H_INT | SWS_ACCURATE_RND (libswscale/swscale.h)
DALI_CONVERSION = 0x2 | 0x2000 | 0x40000
FULL_RANGE = 2  # AVColorRange: 2 = full (JPEG), else limited


class CorruptClip(ValueError):
    """Clip bytes that do not decode to the expected frames."""


def iter_frames(data: bytes) -> Iterator[np.ndarray]:
    """Each frame of the clip's first video stream, in order, as (H, W, 3) uint8 RGB: a view of the frame
    PyAV converted it into (no copy). Raises CorruptClip where decoding fails."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                full = int(frame.color_range or 0) == FULL_RANGE
                yield frame.to_ndarray(
                    format="rgb24",
                    threads=1,
                    interpolation=DALI_CONVERSION,
                    src_colorspace="ITU601",
                    src_color_range="JPEG" if full else "MPEG",
                    dst_color_range="JPEG",
                )
    except (av.error.FFmpegError, IndexError) as err:
        raise CorruptClip(f"cannot decode clip: {err}") from None


def decode_frames(data: bytes, num_frames: int | None = None) -> list[np.ndarray]:
    """-> the clip's frames, each (H, W, 3) uint8, unstacked. Raises CorruptClip if decoding fails or
    yields the wrong frame count."""
    frames = list(iter_frames(data))
    if not frames or (num_frames is not None and len(frames) != num_frames):
        raise CorruptClip(f"clip decoded to {len(frames)} frames, expected {num_frames}")
    return frames


def decode_clip(data: bytes, num_frames: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """-> (T, H, W, 3) uint8. Raises CorruptClip if decoding fails or yields the wrong frame count.

    out: a (N, H, W, 3) uint8 array to decode into, frame by frame (no stacking copy); -> out[:T]. A
    clip with more than N frames or frames of another size raises CorruptClip; out may then hold part of
    it."""
    if out is None:
        return np.stack(decode_frames(data, num_frames))
    n = 0
    with contextlib.closing(iter_frames(data)) as frames:
        for frame in frames:
            if n == len(out) or frame.shape != out.shape[1:]:
                what = f"{n + 1}+ frames" if n == len(out) else f"a frame of shape {frame.shape}"
                raise CorruptClip(f"clip decoded to {what}, expected {tuple(out.shape)}")
            out[n] = frame
            n += 1
    if not n or (num_frames is not None and n != num_frames):
        raise CorruptClip(f"clip decoded to {n} frames, expected {num_frames}")
    return out[:n]


def to_model_input(clips: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32 in [0, 1] on `device` (converted there)."""
    x = torch.as_tensor(clips).to(device, non_blocking=True)
    return x.permute(0, 4, 1, 2, 3).float().div_(255.0)
