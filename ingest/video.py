"""Probing source videos and cutting clips out of them (PyAV / libav).

A clip is decoded frame-accurately (sequential decode, frames counted from the first), scaled so its
short side is `size`, centre-cropped to size x size by a libavfilter graph, and encoded VP9 in WebM (every
DALI backend decodes VP9, CPU included) or H.264 in MP4 (GPU-only sites).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from fractions import Fraction
from typing import IO, Any

import av

from ingest.clip_plan import Clip, VideoInfo

CODECS = {
    # codec name: (container format, libav encoder, encoder options, file extension)
    "vp9": (
        "webm",
        "libvpx-vp9",
        {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "32", "b": "0"},
        "webm",
    ),
    "h264": ("mp4", "libx264", {"preset": "veryfast", "crf": "23"}, "mp4"),
}


class BadVideo(Exception):
    """A source that cannot give any clip; `reason` is a short machine-friendly category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def probe(
    src: str | IO[bytes], uri: str, label: str | None = None, meta: dict[str, Any] | None = None
) -> VideoInfo:
    """Read the container header: frame count, frame rate, size. Raises BadVideo with a reason."""
    try:
        with av.open(src, metadata_errors="ignore") as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise BadVideo("no-video-stream", f"streams: {', '.join(kinds)}")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate or rate <= 0:
                raise BadVideo("no-frame-rate", "the video stream has no frame rate")
            frames = stream.frames
            if frames <= 0:  # many containers don't store a count: estimate it from the duration
                if stream.duration is not None and stream.time_base is not None:
                    seconds = float(stream.duration * stream.time_base)
                elif container.duration is not None:
                    seconds = container.duration / av.time_base
                else:
                    raise BadVideo("no-duration", "neither a frame count nor a duration")
                frames = int(seconds * float(rate))
            width, height = stream.codec_context.width, stream.codec_context.height
            if width <= 0 or height <= 0:
                raise BadVideo("no-size", "the video stream has no frame size")
            return VideoInfo(uri, int(frames), float(rate), width, height, label, dict(meta or {}))
    except BadVideo:
        raise
    except (av.error.InvalidDataError, av.error.EOFError) as err:
        raise BadVideo("not-a-video", str(err)) from None
    except av.error.FFmpegError as err:
        raise BadVideo("unreadable", str(err)) from None


def _scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Short side to `size`, aspect kept, both even (for 4:2:0 chroma)."""
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    return w + (w % 2), h + (h % 2)


class _ClipEncoder:
    """One clip being written: a muxer over an in-memory buffer."""

    def __init__(self, clip: Clip, size: int, codec: str):
        fmt, encoder, options, _ = CODECS[codec]
        self.clip = clip
        self.buffer = io.BytesIO()
        # bitexact: no random segment id or creation date in the header, so the bytes are reproducible
        self.container = av.open(self.buffer, mode="w", format=fmt, options={"fflags": "+bitexact"})
        rate = Fraction(clip.out_fps).limit_denominator(1001)
        self.stream = self.container.add_stream(encoder, rate=rate, options=dict(options))
        self.stream.width = self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = 1 / rate
        self.stream.thread_count = 1  # ingest scales with processes, not threads (STACK.md)
        self.written = 0

    def add(self, frame: av.VideoFrame) -> None:
        frame.pts = self.written
        frame.time_base = self.stream.codec_context.time_base
        self.container.mux(self.stream.encode(frame))
        self.written += 1

    def finish(self) -> bytes:
        self.container.mux(self.stream.encode(None))
        self.container.close()
        return self.buffer.getvalue()

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # nothing to save from a half-written clip
            self.container.close()


def _filter_graph(stream: av.video.stream.VideoStream, size: int) -> av.filter.Graph:
    graph = av.filter.Graph()
    graph.threads = 1  # the automatic default was ~30% slower with parallel processes (STACK.md)
    w, h = _scaled_size(stream.codec_context.width, stream.codec_context.height, size)
    src = graph.add_buffer(template=stream)
    scale = graph.add("scale", f"{w}:{h}:flags=area")
    crop = graph.add("crop", f"{size}:{size}")
    fmt = graph.add("format", "yuv420p")
    sink = graph.add("buffersink")
    src.link_to(scale)
    scale.link_to(crop)
    crop.link_to(fmt)
    fmt.link_to(sink)
    graph.configure()
    return graph


def cut_clips(
    src: str | IO[bytes], clips: list[Clip], size: int, codec: str = "vp9"
) -> Iterator[tuple[Clip, bytes | BadVideo]]:
    """Encode `clips` (all from the one source, starts ascending) -> (clip, encoded bytes or BadVideo).

    Decodes the source once, from its first frame up to the last frame any clip needs; overlapping
    clips share the decoded frames. A clip the source cannot complete (truncated or corrupt data) comes
    back as BadVideo and the clips before it are kept.
    """
    if not clips:
        return
    wanted: dict[int, list[Clip]] = {}
    for clip in clips:
        for idx in clip.frame_indices():
            wanted.setdefault(idx, []).append(clip)
    last_needed = max(wanted)
    open_clips: dict[str, _ClipEncoder] = {}
    done: set[str] = set()
    error: BadVideo | None = None
    try:
        with av.open(src, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            graph = _filter_graph(stream, size)
            index = -1
            for frame in container.decode(stream):
                index += 1
                if index > last_needed:
                    break
                users = wanted.get(index)
                if not users:
                    continue
                graph.push(frame)
                out = graph.pull()
                for clip in users:
                    enc = open_clips.get(clip.key)
                    if enc is None:
                        enc = open_clips[clip.key] = _ClipEncoder(clip, size, codec)
                    enc.add(out)
                    if enc.written == clip.num_frames:
                        del open_clips[clip.key]
                        done.add(clip.key)
                        yield clip, enc.finish()
            if index < last_needed:
                error = BadVideo("truncated", f"decoded {index + 1} frames, the plan needs {last_needed + 1}")
    except av.error.FFmpegError as err:
        error = BadVideo("undecodable", f"decoding failed: {err}")
    for enc in open_clips.values():
        enc.abort()
    for clip in clips:
        if clip.key not in done:
            yield clip, error or BadVideo("undecodable", "clip incomplete")


def clip_extension(codec: str) -> str:
    return CODECS[codec][3]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
