"""Cutting clips out of source videos (PyAV / libav); ingest.probe probes them.

A clip is decoded frame-accurately (sequential decode, frames counted from the first), turned upright
(the source's display matrix), scaled so its short side is `size`, centre-cropped to size x size, and
converted to the one declared output colour (OUTPUT_COLOUR: BT.601 matrix, limited range, 8-bit 4:2:0,
from the source's own matrix, range and bit depth) by a libavfilter graph, then encoded VP9 in WebM
(every DALI backend decodes VP9, CPU included) or H.264 in MP4 (GPU-only sites), with its colour tags.

Why BT.601: DALI's video decoder converts YUV with the BT.601 matrix whatever a clip's tags say (it
honours only the range; measured with DALI 2.4 on CPU), and the other readers of clips
(ingest.clip_decode) convert the same way, so all three see the same pixels and the right colours.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
from collections.abc import Iterator
from fractions import Fraction
from typing import IO

import av

from ingest.clip_plan import Clip, Look
from ingest.probe import BadVideo

# The colour every clip is written in (the scale filter's names), and its tags (libav's AVCOL_* numbers:
# range 1 = limited; colorspace, primaries and transfer 6 = SMPTE 170M, i.e. BT.601 525-line).
OUTPUT_COLOUR = {"matrix": "bt601", "range": "limited", "bit_depth": 8, "chroma": "4:2:0"}
OUTPUT_TAGS = {"color_range": 1, "colorspace": 6, "color_primaries": 6, "color_trc": 6}
# Turning a stored picture upright: its rotation (counter-clockwise degrees) -> libavfilter filters
UPRIGHT = {
    0: (),
    90: (("transpose", "cclock"),),
    180: (("hflip", ""), ("vflip", "")),
    270: (("transpose", "clock"),),
}

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
        rate = Fraction(clip.out_fps).limit_denominator(1001) or Fraction(clip.out_fps).limit_denominator()
        self.stream = self.container.add_stream(encoder, rate=rate, options=dict(options))
        self.stream.width = self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        for tag, value in OUTPUT_TAGS.items():
            setattr(self.stream.codec_context, tag, value)
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


# setparams' names for the matrices ingest.probe reports (the scale filter's names)
SETPARAMS_MATRIX = {"bt2020": "bt2020nc", "fcc": "fcc", "smpte240m": "smpte240m"}


def _needs_colour(look: Look) -> bool:
    """False when the source already is the output colour (8-bit BT.601 limited): no conversion pass."""
    return look.matrix not in ("bt470bg", "smpte170m") or look.full_range or look.bit_depth != 8


def _filter_graph(stream: av.video.stream.VideoStream, size: int, look: Look) -> av.filter.Graph:
    """buffer -> [setparams: the source's matrix and range made explicit] -> upright -> scale (short side
    to size) -> centre crop -> [scale: the source's matrix, range and depth to OUTPUT_COLOUR] -> 8-bit
    4:2:0 -> sink. The colour pass runs at the clip's size, after the crop: converting the matrix of a
    720p frame before scaling cost a third more CPU than the whole graph without it; after, 7%."""
    graph = av.filter.Graph()
    graph.threads = 1  # the automatic default was ~30% slower with parallel processes (STACK.md)
    width, height = stream.codec_context.width, stream.codec_context.height
    if look.rotation in (90, 270):
        width, height = height, width
    w, h = _scaled_size(width, height, size)
    tags, colour = [], []
    if _needs_colour(look):
        matrix = SETPARAMS_MATRIX.get(look.matrix, look.matrix)
        tags = [graph.add("setparams", f"colorspace={matrix}:range={'pc' if look.full_range else 'tv'}")]
        colour = [graph.add("scale", f"flags=area:out_color_matrix={OUTPUT_COLOUR['matrix']}:out_range=tv")]
    chain = [
        graph.add_buffer(template=stream),
        *tags,
        *(graph.add(name, args) for name, args in UPRIGHT[look.rotation]),
        graph.add("scale", f"{w}:{h}:flags=area"),
        graph.add("crop", f"{size}:{size}"),
        *colour,
        graph.add("format", "yuv420p"),
        graph.add("buffersink"),
    ]
    for a, b in itertools.pairwise(chain):
        a.link_to(b)
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
            graph = _filter_graph(stream, size, clips[0].look)
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
