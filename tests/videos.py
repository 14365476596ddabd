"""Generated test videos with known content."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def level(i: int) -> int:
    """Grey level of generated frame i: frames are told apart by brightness after lossy coding."""
    return 10 + 5 * i


def write_ramp_video(
    path: Path, frames: int, fps: int = 25, size: tuple[int, int] = (96, 64), codec: str = "libx264"
) -> Path:
    """A video whose frame i is a flat grey of `level(i)` (distinct for the first 48 frames)."""
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "4", "preset": "veryfast"}
        for i in range(frames):
            img = np.full((h, w, 3), min(level(i), 255), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 16000
        for i in range(16):
            frame.pts = i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def decode_means(data: bytes) -> list[float]:
    """Mean grey level of every frame of an encoded clip."""
    import io

    with av.open(io.BytesIO(data)) as c:
        return [float(f.to_ndarray(format="rgb24").mean()) for f in c.decode(video=0)]
