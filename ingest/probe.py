"""Probing a source video: what it holds, as libav tells it, without trusting what containers lie about.

probe() reads the header, decodes the first frame (rotation and colour tags live on frames in PyAV) and,
where the header's frame count cannot be trusted, demuxes the video packets (no decoding) to count the
frames and read their presentation times:

- Matroska/WebM, MPEG-TS/PS, FLV, Ogg and ASF store no count (0); AVI on a fine time base counts every
  empty "drop" slot (1,401 for 35 frames on a 1/1000 base); a variable-rate file's average_rate is
  frames / duration. Only ISO-BMFF (MP4, MOV, 3GP) with a count and a consistent rate is taken as read.
- Times are measured from the first frame, so an MPEG-TS stream that starts at 1.4 s starts at 0.
- A stream is variable-rate when a frame interval departs from the median one by more than a tick and 2%.
  Its frame times are kept (VideoInfo.frame_times) and the plan samples it by time (ingest.clip_plan).

Colour: the matrix and range are the frame's tags; an untagged matrix is BT.709 from 720 lines up, else
BT.601 (the convention players follow); `yuvj*` formats are full range.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import replace
from fractions import Fraction
from typing import IO, Any

import av

from ingest.clip_plan import Look, VideoInfo

TRUSTED_HEADERS = ("mov",)  # libav's "mov,mp4,m4a,3gp,3g2,mj2": the sample table counts every frame
RATE_TOLERANCE = 0.02  # relative: an interval this far from the median (and over a tick) makes a stream VFR
# libav's AVColorSpace numbers -> the matrix name the scale filter takes
MATRICES = {1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}
TRANSFERS = {16: "smpte2084", 18: "arib-std-b67"}  # the HDR transfers (PQ, HLG): reported, not tone-mapped
FULL_RANGE = 2  # AVColorRange: 1 limited (MPEG), 2 full (JPEG)


class BadVideo(Exception):
    """A source that cannot give any clip; `reason` is a short machine-friendly category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _first_frame(packets, stream) -> av.VideoFrame | None:
    for packet in packets:
        for frame in packet.decode():
            return frame
    return None


def _look(frame: av.VideoFrame, height: int) -> Look:
    """How to read the source's pixels: rotation and colour, from the first decoded frame's tags."""
    tagged = MATRICES.get(int(frame.colorspace or 0))
    fmt = frame.format.name
    full = int(frame.color_range or 0) == FULL_RANGE or fmt.startswith("yuvj")
    depth = max((c.bits for c in frame.format.components), default=8)
    rotation = round(float(getattr(frame, "rotation", 0) or 0) / 90) * 90 % 360
    return Look(
        rotation=rotation,
        matrix=tagged or ("bt709" if height >= 720 else "bt470bg"),
        matrix_tagged=tagged is not None,
        full_range=full,
        bit_depth=depth,
        transfer=TRANSFERS.get(int(frame.color_trc or 0), ""),
        pix_fmt=fmt,
    )


def _is_variable(ticks: list[int]) -> bool:
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    if len(gaps) < 2:
        return False
    median = statistics.median(gaps)
    return any(abs(g - median) > max(1, RATE_TOLERANCE * median) for g in gaps)


def probe(
    src: str | IO[bytes], uri: str, label: str | None = None, meta: dict[str, Any] | None = None
) -> VideoInfo:
    """Frame count, frame rate (and times where it varies), size, rotation, colour. Raises BadVideo."""
    try:
        with av.open(src, metadata_errors="ignore") as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise BadVideo("no-video-stream", f"streams: {', '.join(kinds)}")
            stream = container.streams.video[0]
            declared = container.duration / av.time_base if container.duration else None
            width, height = stream.codec_context.width, stream.codec_context.height
            if width <= 0 or height <= 0:
                raise BadVideo(
                    "no-size",
                    f"the video stream has no frame size ({container.format.name}: libav cannot decode it)",
                )
            stream.thread_type = "SLICE"  # no frame threads: the first frame comes out of its packet
            header_rate = stream.average_rate or stream.guessed_rate
            base = stream.base_rate or header_rate
            consistent = bool(header_rate and base and abs(header_rate / base - 1) < 0.01)
            trusted = container.format.name.split(",")[0] in TRUSTED_HEADERS and stream.frames > 0
            ticks: list[int] = []

            def packets():
                for p in container.demux(stream):
                    t = p.pts if p.pts is not None else p.dts
                    if p.size > 0 and t is not None:
                        ticks.append(t)
                    yield p

            demuxed = packets()
            first = _first_frame(demuxed, stream)
            if first is None:
                raise BadVideo("undecodable", "no frame decodes")
            look = _look(first, height)
            names = {"container": container.format.name.split(",")[0], "codec": stream.codec_context.name}
            if trusted and consistent:
                return VideoInfo(
                    uri,
                    stream.frames,
                    float(header_rate),
                    width,
                    height,
                    label,
                    dict(meta or {}),
                    look,
                    **names,
                )
            for _ in demuxed:  # the rest of the packets: counted, not decoded
                pass
            time_base = stream.time_base  # read while the container is open (after closing it is freed)
    except BadVideo:
        raise
    except (av.error.InvalidDataError, av.error.EOFError) as err:
        raise BadVideo("not-a-video", str(err)) from None
    except av.error.FFmpegError as err:
        raise BadVideo("unreadable", str(err)) from None
    info = replace(
        _counted(uri, sorted(set(ticks)), time_base, header_rate, width, height, label, meta, look),
        **names,
    )
    if declared is not None and declared - info.duration > max(1.0, 0.1 * declared):
        return replace(
            info, damage=f"the stream ends at {info.duration:.2f} s; the header says {declared:.2f} s"
        )
    return info


def _counted(uri, ticks, time_base, header_rate, width, height, label, meta, look) -> VideoInfo:
    """VideoInfo from the stream's own packet times (frames counted, times from the first frame)."""
    if not ticks:
        raise BadVideo("no-duration", "the video stream has no timed packets")
    tb = Fraction(time_base) if time_base else Fraction(1, 1000)
    times = tuple(float((t - ticks[0]) * tb) for t in ticks)
    variable = _is_variable(ticks)
    if len(ticks) > 1:
        gap = float(statistics.median(b - a for a, b in itertools.pairwise(ticks)) * tb)
        rate = (len(ticks) - 1) / times[-1] if variable else 1 / gap
        if header_rate and not variable and abs(float(header_rate) * gap - 1) < 0.01:
            rate = float(header_rate)  # the header's exact rate (30000/1001), where it agrees
    elif header_rate:
        rate = float(header_rate)
    else:
        raise BadVideo("no-frame-rate", "one frame and no frame rate")
    return VideoInfo(
        uri, len(ticks), rate, width, height, label, dict(meta or {}), look,
        frame_times=times if variable else None, frames_counted=True,
    )  # fmt: skip


def sniff(fs: Any, path: str) -> str | None:
    """None when libav opens the file as a moving picture, else why a directory scan passes it over:
    empty, still-image, audio-only, no-video-stream, not-media or unreadable."""
    try:
        with fs.open(path, "rb") as f:
            if fs.size(path) == 0:
                return "empty"
            with av.open(f, metadata_errors="ignore") as container:
                video = [
                    s
                    for s in container.streams.video
                    if not s.disposition & av.stream.Disposition.attached_pic
                ]
                if not video:
                    return "audio-only" if container.streams.audio else "no-video-stream"
                name = container.format.name
                if name == "image2" or (name.endswith("_pipe") and name != "webp_pipe"):
                    return "still-image"
                return None
    except av.error.FFmpegError:
        return "not-media"
    except OSError:
        return "unreadable"
