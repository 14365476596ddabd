"""Test videos in the formats users bring; every frame shows its number as a code `read_code` reads.

    w = FORMATS["mkv_vfr"](tmp_path / "a.mkv")      # or write_format("mkv_vfr", tmp_path)
    w.path, w.times, w.size, w.rotation, w.patches, w.tags, w.start
    read_code(upright(frame.to_ndarray(format="rgb24"), frame.rotation)) == i  # frame i, in order

Frame i shows `code_frame(i)`: 12 bits as black/white cells in the middle 60% of the frame's central
square (all the ingest's centre crop keeps), ringed by an orientation marker, on mid-grey. `read_code`
reads it back from any crop of that square >= 32 px, and gives None for a turned, mirrored or non-code
picture. Colour files add 16 flat patches (PATCHES: greys 0..255, saturated colours) around the code.

Facts, measured 2026-12-04 with PyAV 18.1 (FFmpeg 8 libraries: libavcodec 62.28, libavformat 62.12) on
the files these writers make (`facts(path)` measures them; ffmpeg CLI/ffprobe: Debian 12's 5.1.9).
frames: stream.frames, the header's claim; decoded: frames PyAV's decode gives; average/base/guessed:
stream.average_rate/base_rate/guessed_rate; start s: stream.start_time x time_base (= the first
frame's `time`); dur s: stream / container duration; probe() today: ingest.video.probe's frame count
@ fps as of this date (frames, else duration x (average_rate or guessed_rate)).

name               format    codec pix_fmt      frames decoded average    base guessed time_base start s dur s st/ct probe() today
------------------ --------- ------------------ ------ ------- ---------- ---- ------- --------- ------- ----------- --------------------
mp4_h264           mov       h264 yuv420p       50     50      25         25   25      1/12800   0       2/2         50 @ 25
mp4_vfr            mov       h264 yuv420p       70     70      70000/2901 50   50      1/16000   0       2.901/2.901 70 @ 24.13
avi_mpeg4          avi       mpeg4 yuv420p      50     50      25         25   25      1/25      0       2/2         50 @ 25
webm_vp9           matroska  vp9 yuv420p        0      50      25         25   25      1/1000    0       -/2         50 @ 25
mkv_ffv1           matroska  ffv1 yuv444p       0      50      25         25   25      1/1000    0       -/2         50 @ 25
mkv_vfr            matroska  h264 yuv420p       0      70      1000       50   50      1/1000    0       -/2.901     2901 @ 1000
avi_ms_vfr         avi       mpeg4 yuv420p      1401   35      1000       50   50      1/1000    0       1.401/1.401 1401 @ 1000
avi_mjpeg_full     avi       mjpeg yuvj420p     25     25      25         25   25      1/25      0       1/1         25 @ 25
mp4_h264_full      mov       h264 yuvj420p      25     25      25         25   25      1/12800   0       1/1         25 @ 25
mp4_hevc10_bt2020  mov       hevc yuv420p10le   25     25      25         25   25      1/12800   0       1/1         25 @ 25
mov_prores10_bt709 mov       prores yuv422p10le 25     25      25         25   25      1/12800   0       1/1         25 @ 25
mp4_bt601          mov       h264 yuv420p       25     25      25         25   25      1/12800   0       1/1         25 @ 25
mp4_bt709          mov       h264 yuv420p       25     25      25         25   25      1/12800   0       1/1         25 @ 25
mp4_rot90          mov       h264 yuv420p       25     25      25         25   25      1/12800   0       1/1         25 @ 25
mp4_rot180         mov       h264 yuv420p       25     25      25         25   25      1/12800   0       1/1         25 @ 25
mp4_rot270         mov       h264 yuv420p       25     25      25         25   25      1/12800   0       1/1         25 @ 25
gif                gif       gif bgra           20     20      10         10   10      1/100     0       2/2         20 @ 10
webp_anim          webp_pipe webp -             0      error   25         25   25      1/25      -       -/-         BadVideo no-duration
mpegts             mpegts    mpeg2video yuv420p 0      50      25         25   25      1/90000   1.44    2/2         50 @ 25
m2ts               mpegts    h264 yuv420p       0      50      25         25   25      1/90000   1.48    2/2         50 @ 25
flv                flv       flv yuv420p        0      50      25         25   25      1/1000    0       -/2         50 @ 25
3gp                mov       h263 yuv420p       30     30      15         15   15      1/15360   0       2/2         30 @ 15
mpg                mpeg      mpeg1video yuv420p 0      50      25         50   25      1/90000   0.54    1.98/1.98   49 @ 25
ogv                ogg       theora yuv420p     0      50      None       25   25      1/25      0       2/2         50 @ 25
wmv                asf       wmv2 yuv420p       0      50      25         25   25      1/1000    0       2/2         50 @ 25

(format "mov" is "mov,mp4,m4a,3gp,3g2,mj2", "matroska" is "matroska,webm".)

- Every file opens with av.open. All but webp_anim decode, every frame, with `frame.time` equal to the
  written presentation time (+ start s) for every format, VFR MP4/MKV/AVI and GIF included (GIF
  delays are 1/100 s). Animated WebP does not decode in PyAV 18.1 nor in FFmpeg 5.1: the webp_pipe
  demuxer gives one packet, width 0, and decoding raises InvalidDataError (probe() reports
  "no-duration"); Pillow reads its frames and 100 ms durations.
- stream.frames is 0 for Matroska/WebM, MPEG-TS/M2TS, MPEG-PS, FLV, Ogg and ASF. For AVI on a 1/1000
  time base it counts every 1 ms slot up to the last frame (1401 for 35 frames over 1.4 s; STACK.md's
  11,876 for 300 frames is the same rule) and average_rate is 1000, as for VFR Matroska: probe() then
  plans 2901 and 1401 frames at 1000 fps for 70 and 35 real ones. base_rate/guessed_rate (50: the
  fastest segment) are no better for VFR. average_rate of a VFR MP4 is frames / duration (24.13);
  Ogg/Theora has no average_rate (None; guessed_rate 25). MPEG-PS's duration is estimated (1.98 s for
  2 s: probe() says 49 frames for 50).
- Non-zero starts: MPEG-TS 1.44 s (muxed with max_delay 0.7 s as the ffmpeg CLI does; PyAV's default
  gives 0.04 s), M2TS with H.264 1.48 s (B-frame delay), MPEG-PS 0.54 s. Others start at 0.
- Colour (codec_context and decoded frame agree; range/colorspace/primaries/trc as AVCOL_* numbers,
  0/2/2/2 = unspecified for every code-only file except webm_vp9, mpegts and mpg: range 1, limited):
    avi_mjpeg_full 2/5/2/2 yuvj420p;  mp4_h264_full 2/5/5/6 yuvj420p (the H.264 decoder turns a
    full-range yuv420p stream into yuvj420p);  mp4_hevc10_bt2020 1/9/9/14;  mov_prores10_bt709 1/1/1/1;
    mp4_bt601 1/6/6/6;  mp4_bt709 1/1/1/1.  PyAV 18.1's frame.to_ndarray(format="rgb24") converts by
    the frame's colorspace and range: every patch comes back within 4 levels; with the other matrix
    the most-moved saturated patch is off by 16 (BT.2020 read as BT.709) to 40 levels (BT.601 read
    as BT.709); greys stay.
- Rotation: PyAV exposes the display matrix only on decoded frames (`frame.rotation`, from the
  DISPLAYMATRIX frame side data; 90, -180, -90 for 90, 180, 270), not on the stream (VideoStream has
  no side data; no "rotate" metadata). It is the counter-clockwise angle to turn the decoded picture
  by to show it upright (see write_rotated); ffprobe prints it as stream side data `rotation=`.
- The ingest as of today (ingest.video.cut_clips to 32 px): every decodable format gives clips whose
  codes read 2..17 for a clip starting at frame 2; the rotated files give clips turned as stored
  (rotation ignored); the full-range files give clips with the range not converted (grey 16 -> 0,
  64 -> 55, 235 -> 255: contrast stretched); BT.709/BT.2020 sources come out converted (untagged
  clips, saturated patches within 6 levels, greys ~3 levels low).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import subprocess
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import av
import numpy as np

# ---------------------------------------------------------------------------------------------------
# Frame codes
#
# The ingest scales the short side and centre-crops a square, so everything lives in the frame's
# central square, seen as a 5x5 grid of "patch" cells. The code fills the inner 3x3 of them (the
# middle 60% of the square) as a 6x6 grid of black/white cells: a ring of 20 fixed cells (the
# orientation marker) around 4x4 cells, 12 data bits (rows 1-3: n, most significant bit first) and a
# row of 4 check bits (inverted parity of each data column). The ring pattern was picked so that each
# of the 7 rotations and mirrors of the square changes 10 of its 20 cells: a turned or mirrored code
# never reads. The outer ring of 16 patch cells is grey, or flat colour patches (`PATCHES`).
# Checked 2026-12-04: all 4096 codes, from 160x120, 128x96 and 176x144 frames through H.264 crf 18 ->
# area scale + centre crop to 64x64 and to 32x32 -> VP9 crf 32 (the ingest's path), read back.
# ---------------------------------------------------------------------------------------------------

GREY = (128, 128, 128)
CODE_BOX = (0.2, 0.8)  # the code's extent, in fractions of the central square's side
_N = 6
_RING = [(r, c) for r in range(_N) for c in range(_N) if r in (0, _N - 1) or c in (0, _N - 1)]
_RING_BITS = (0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0)
MAX_CODE = 4095


class Patch(NamedTuple):
    """A flat colour patch: its name, the RGB a correct decoder gives, and its box in fractions of
    the central square's side (x0, y0, x1, y1), so it can be found in a crop of any size."""

    name: str
    rgb: tuple[int, int, int]
    box: tuple[float, float, float, float]


def _patch_cells() -> list[tuple[int, int]]:
    """The outer ring of the central square's 5x5 grid, clockwise from the top-left: (row, col)."""
    top = [(0, c) for c in range(5)]
    right = [(r, 4) for r in range(1, 5)]
    bottom = [(4, c) for c in range(3, -1, -1)]
    left = [(r, 0) for r in range(3, 0, -1)]
    return top + right + bottom + left


_PATCH_COLOURS: list[tuple[str, tuple[int, int, int]]] = [
    ("grey0", (0, 0, 0)),
    ("grey16", (16, 16, 16)),
    ("grey64", (64, 64, 64)),
    ("grey128", (128, 128, 128)),
    ("grey192", (192, 192, 192)),
    ("grey235", (235, 235, 235)),
    ("grey255", (255, 255, 255)),
    ("red", (255, 0, 0)),
    ("green", (0, 255, 0)),
    ("blue", (0, 0, 255)),
    ("yellow", (255, 255, 0)),
    ("cyan", (0, 255, 255)),
    ("magenta", (255, 0, 255)),
    ("orange", (255, 128, 0)),
    ("skin", (224, 172, 140)),
    ("navy", (32, 64, 128)),
]
PATCHES: list[Patch] = [
    Patch(name, rgb, (c / 5, r / 5, (c + 1) / 5, (r + 1) / 5))
    for (name, rgb), (r, c) in zip(_PATCH_COLOURS, _patch_cells())
]


def central_square(width: int, height: int) -> tuple[int, int, int]:
    """-> (x0, y0, side) of the frame's central square (what the ingest's centre crop keeps)."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def code_cells(n: int) -> np.ndarray:
    """The 6x6 black (0) / white (1) cells that show n."""
    if not 0 <= n <= MAX_CODE:
        raise ValueError(f"a frame code is 0..{MAX_CODE}, not {n}")
    g = np.zeros((_N, _N), np.uint8)
    for (r, c), b in zip(_RING, _RING_BITS):
        g[r, c] = b
    for i in range(12):
        g[1 + i // 4, 1 + i % 4] = (n >> (11 - i)) & 1
    for c in range(4):
        g[4, 1 + c] = 1 ^ g[1, 1 + c] ^ g[2, 1 + c] ^ g[3, 1 + c]
    return g


def code_frame(
    n: int,
    width: int,
    height: int,
    rgb: tuple[int, int, int] = GREY,
    patches: Sequence[Patch] = (),
) -> np.ndarray:
    """An (height, width, 3) uint8 picture of background colour `rgb` whose central square shows n
    (0..4095) as a code, with `patches` (e.g. PATCHES) painted around it."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = rgb
    x0, y0, s = central_square(width, height)
    for p in patches:
        bx0, by0, bx1, by1 = (round(s * f) for f in p.box)
        img[y0 + by0 : y0 + by1, x0 + bx0 : x0 + bx1] = p.rgb
    a, b = CODE_BOX
    edges = [round(s * (a + (b - a) * i / _N)) for i in range(_N + 1)]
    g = code_cells(n)
    for r in range(_N):
        for c in range(_N):
            img[y0 + edges[r] : y0 + edges[r + 1], x0 + edges[c] : x0 + edges[c + 1]] = 255 * g[r, c]
    return img


def _box_mean(img: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Mean colour of the middle half of a box (pixel coordinates, fractional)."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hx, hy = max((x1 - x0) / 4, 0.5), max((y1 - y0) / 4, 0.5)
    xa, xb = int(np.floor(cx - hx)), int(np.ceil(cx + hx))
    ya, yb = int(np.floor(cy - hy)), int(np.ceil(cy + hy))
    return img[ya:yb, xa:xb].reshape(-1, img.shape[2]).astype(np.float64).mean(axis=0)


def read_code(img: np.ndarray) -> int | None:
    """The n an upright code in `img` (H, W, 3 RGB, any size with a central square >= 32 px) shows;
    None when the picture is not an upright code: turned by 90/180/270 degrees, mirrored, blank or
    anything else (a ring cell, check bit or unclear cell gives it away)."""
    h, w = img.shape[:2]
    side = min(h, w)
    x0, y0 = (w - side) / 2, (h - side) / 2
    a, b = CODE_BOX
    cell = side * (b - a) / _N
    v = np.empty((_N, _N))
    for r in range(_N):
        for c in range(_N):
            cx0, cy0 = x0 + side * a + c * cell, y0 + side * a + r * cell
            v[r, c] = _box_mean(img, cx0, cy0, cx0 + cell, cy0 + cell).mean()
    ring = np.array([v[p] for p in _RING])
    on = np.array(_RING_BITS, bool)
    white, black = ring[on].mean(), ring[~on].mean()
    if white - black < 80:
        return None
    threshold = (white + black) / 2
    if np.any(np.abs(v - threshold) < 0.15 * (white - black)):  # a cell neither black nor white
        return None
    g = (v > threshold).astype(np.uint8)
    n = 0
    for i in range(12):
        n = 2 * n + int(g[1 + i // 4, 1 + i % 4])
    return n if np.array_equal(g, code_cells(n)) else None


def read_code_any_rotation(img: np.ndarray) -> tuple[int, int] | None:
    """-> (n, degrees): `np.rot90(img, degrees // 90)` (a counter-clockwise turn by `degrees`) shows
    n upright; None if no turn does (mirrored pictures stay unreadable)."""
    for k in range(4):
        n = read_code(np.rot90(img, k))
        if n is not None:
            return n, 90 * k
    return None


def read_patches(img: np.ndarray, patches: Sequence[Patch] = PATCHES) -> list[tuple[float, ...]]:
    """Mean colour (one value per channel of `img`, (H, W, C)) of the middle half of each patch,
    found in the central square of `img`."""
    h, w = img.shape[:2]
    side = min(h, w)
    x0, y0 = (w - side) / 2, (h - side) / 2
    out = []
    for p in patches:
        bx0, by0, bx1, by1 = p.box
        m = _box_mean(img, x0 + side * bx0, y0 + side * by0, x0 + side * bx1, y0 + side * by1)
        out.append(tuple(float(x) for x in m))
    return out


def upright(img: np.ndarray, rotation: float) -> np.ndarray:
    """Turn a decoded picture as its display matrix says (`rotation`: PyAV's `frame.rotation`, the
    counter-clockwise angle, as ffprobe's `rotation` and ffmpeg's `-display_rotation`)."""
    return np.ascontiguousarray(np.rot90(img, round(rotation / 90) % 4))


# ---------------------------------------------------------------------------------------------------
# Colour: Y'CbCr computed here (numpy) with the exact matrix and range, instead of trusting swscale's
# RGB -> YUV path to honour a matrix; flat patches are aligned to 2x2 pixel blocks, so chroma
# subsampling keeps them exact and "the RGB a correct decoder gives" is the patch's RGB.
# ---------------------------------------------------------------------------------------------------

# Kr, Kb of each matrix
MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}
# AVCOL_SPC_* of each matrix (frame.colorspace / codec_context.colorspace)
COLORSPACE_IDS = {"bt709": 1, "bt601": 6, "bt470bg": 5, "bt2020": 9}


def rgb_to_yuv(img: np.ndarray, matrix: str, full_range: bool, bits: int = 8) -> np.ndarray:
    """(H, W, 3) uint8 R'G'B' -> (H, W, 3) float Y'CbCr code values (not rounded) of `bits` bits."""
    kr, kb = MATRICES[matrix]
    rgb = img.astype(np.float64) / 255
    y = kr * rgb[..., 0] + (1 - kr - kb) * rgb[..., 1] + kb * rgb[..., 2]
    cb = (rgb[..., 2] - y) / (2 * (1 - kb))
    cr = (rgb[..., 0] - y) / (2 * (1 - kr))
    scale = 1 << (bits - 8)
    if full_range:
        top = (1 << bits) - 1
        planes = (y * top, cb * top + (top + 1) / 2, cr * top + (top + 1) / 2)
    else:
        planes = ((16 + 219 * y) * scale, (128 + 224 * cb) * scale, (128 + 224 * cr) * scale)
    return np.stack(planes, axis=-1)


def yuv_frame(img: np.ndarray, pix_fmt: str, matrix: str, full_range: bool) -> av.VideoFrame:
    """An RGB picture as a VideoFrame of `pix_fmt` (yuv420p, yuvj420p, yuv420p10le, yuv422p10le),
    converted with `matrix` and range here, the frame tagged with them."""
    bits = 10 if "10" in pix_fmt else 8
    yuv = rgb_to_yuv(img, matrix, full_range, bits)
    h, w = img.shape[:2]
    dtype = np.uint16 if bits > 8 else np.uint8
    top = (1 << bits) - 1

    def q(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(a), 0, top).astype(dtype)

    luma = q(yuv[..., 0])
    if pix_fmt.startswith(("yuv420p", "yuvj420p")):
        chroma = yuv[..., 1:].reshape(h // 2, 2, w // 2, 2, 2).mean(axis=(1, 3))
        u, v = q(chroma[..., 0]), q(chroma[..., 1])
        packed = np.concatenate([luma.reshape(-1), u.reshape(-1), v.reshape(-1)])
        frame = av.VideoFrame.from_ndarray(packed.reshape(h * 3 // 2, w), format=pix_fmt)
    elif pix_fmt == "yuv422p10le":
        chroma = yuv[..., 1:].reshape(h, w // 2, 2, 2).mean(axis=2)
        full = np.repeat(chroma, 2, axis=1)  # from_ndarray takes every other column
        frame = av.VideoFrame.from_ndarray(np.stack([luma, q(full[..., 0]), q(full[..., 1])]), format=pix_fmt)
    else:
        raise ValueError(f"no YUV packing for {pix_fmt}")
    frame.colorspace = COLORSPACE_IDS[matrix]
    frame.color_range = 2 if full_range else 1
    return frame


# ---------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Written:
    """What a writer wrote. Frame i (in presentation order) shows code i.

    times: presentation time of each frame in seconds, from the first frame (a container may add an
    offset: see `start`). size: (width, height) of the picture as displayed (after rotation).
    rotation: the display matrix's counter-clockwise angle (0: none). patches: the colour patches
    and the RGB a correct decoder gives. tags: colour tags the writer meant (AVCOL_* numbers:
    color_range, colorspace, color_primaries, color_trc). start: the first frame's time the
    container reports (seconds), where the writer knows it."""

    path: Path
    times: list[float]
    size: tuple[int, int]
    rotation: int = 0
    patches: tuple[Patch, ...] = ()
    tags: dict[str, int] = dataclasses.field(default_factory=dict)
    start: float = 0.0
    note: str = ""

    @property
    def frames(self) -> int:
        return len(self.times)


SIZE = (160, 120)  # central square 120 px: patches of 24 px, code cells of 12 px (2x2 aligned)


def _cfr_times(fps: float, frames: int) -> list[float]:
    return [i / fps for i in range(frames)]


def _vfr_times(segments: Sequence[tuple[float, float]] = ((1.0, 10), (1.0, 50), (1.0, 10))) -> list[float]:
    """(seconds, fps) segments -> frame times, exact on a 1/1000 time base."""
    times, t_ms = [], 0
    for seconds, fps in segments:
        step = round(1000 / fps)
        for _ in range(round(seconds * fps)):
            times.append(t_ms / 1000)
            t_ms += step
    return times


def _images(count: int, size: tuple[int, int], patches: Sequence[Patch] = ()) -> list[np.ndarray]:
    return [code_frame(i, size[0], size[1], patches=patches) for i in range(count)]


def _write_pyav(
    path: Path,
    images: Sequence[np.ndarray],
    *,
    codec: str,
    fmt: str | None,
    pix_fmt: str,
    fps: float | None = None,
    times: Sequence[float] | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    yuv: tuple[str, bool] | None = None,
    tags: dict[str, int] | None = None,
    rotation: int = 0,
) -> None:
    """Encode `images` with PyAV: at `fps` (pts = frame index), or at `times` (seconds, pts on a
    1/1000 time base, the codec clocked at 1 kHz so no two frames collide). `yuv` = (matrix,
    full_range): convert here (see yuv_frame); else swscale converts (fine for greys)."""
    if (fps is None) == (times is None):
        raise ValueError("give fps or times")
    rate = Fraction(1000) if times is not None else Fraction(fps).limit_denominator(1001)
    time_base = 1 / rate
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=rate, options=dict(options or {}))
        h, w = images[0].shape[:2]
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.codec_context.time_base = time_base
        for key, value in (tags or {}).items():
            setattr(stream.codec_context, key, value)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, img in enumerate(images):
            if yuv is not None:
                frame = yuv_frame(img, pix_fmt, *yuv)
            else:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for key, value in (tags or {}).items():
                setattr(frame, key, value)
            frame.pts = round(times[i] * 1000) if times is not None else i
            frame.time_base = time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _need_ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("this writer needs the ffmpeg command line tool")
    return exe


def _ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    subprocess.run(
        [_need_ffmpeg(), "-nostdin", "-loglevel", "error", "-y", *args],
        input=stdin,
        check=True,
        capture_output=True,
    )


def _write_ffmpeg(path: Path, images: Sequence[np.ndarray], fps: int, args: Sequence[str]) -> None:
    """Encode raw RGB frames piped to the ffmpeg CLI (for what PyAV cannot write)."""
    h, w = images[0].shape[:2]
    raw = b"".join(np.ascontiguousarray(img).tobytes() for img in images)
    _ffmpeg(
        *("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:0"),
        *args,
        str(path),
        stdin=raw,
    )


def qscale(q: int) -> dict[str, str]:
    """Encoder options for a fixed quantiser (the CLI's `-q:v q`; an option named "qscale" is ignored
    silently by libavcodec)."""
    return {"flags": "+qscale", "global_quality": str(q * 118)}  # FF_QP2LAMBDA


X264 = {"preset": "veryfast", "crf": "18"}
X264_COLOUR = {"preset": "veryfast", "crf": "8"}  # patches within a few levels


def write_cfr(
    path: Path,
    codec: str = "libx264",
    fps: float = 25,
    frames: int = 50,
    size: tuple[int, int] = SIZE,
    pix_fmt: str = "yuv420p",
    container: str | None = None,
    options: dict[str, str] | None = None,
) -> Written:
    """Constant frame rate: `frames` frames at `fps` of `codec` in `container` (None: from the
    file name). libx264 gets crf 18 unless `options` say otherwise."""
    if options is None:
        options = X264 if codec == "libx264" else {}
    _write_pyav(
        path, _images(frames, size), codec=codec, fmt=container, pix_fmt=pix_fmt, fps=fps, options=options
    )
    return Written(Path(path), _cfr_times(fps, frames), size)


def write_vfr_mp4(path: Path) -> Written:
    """Variable frame rate H.264 in MP4: 1 s at 10 fps, 1 s at 50 fps, 1 s at 10 fps (70 frames;
    pts on a 1/1000 time base)."""
    times = _vfr_times()
    _write_pyav(
        path,
        _images(len(times), SIZE),
        codec="libx264",
        fmt="mp4",
        pix_fmt="yuv420p",
        times=times,
        options=X264,
    )
    return Written(Path(path), times, SIZE)


def write_mkv_vfr(path: Path) -> Written:
    """Variable frame rate H.264 in Matroska (no frame count in the header), the write_vfr_mp4 times."""
    times = _vfr_times()
    _write_pyav(
        path,
        _images(len(times), SIZE),
        codec="libx264",
        fmt="matroska",
        pix_fmt="yuv420p",
        times=times,
        options=X264,
    )
    return Written(Path(path), times, SIZE)


def write_avi_ms_timebase(path: Path) -> Written:
    """MPEG-4 part 2 in AVI on a 1/1000 time base, variable rate (0.5 s at 10 fps, 0.5 s at 50 fps,
    0.5 s at 10 fps: 35 frames). AVI has no timestamps: the muxer fills every empty 1 ms slot with
    an empty "drop" chunk and the header's frame count (stream.frames) counts them all."""
    times = _vfr_times(((0.5, 10), (0.5, 50), (0.5, 10)))
    _write_pyav(
        path,
        _images(len(times), SIZE),
        codec="mpeg4",
        fmt="avi",
        pix_fmt="yuv420p",
        times=times,
        options=qscale(3),
    )
    return Written(Path(path), times, SIZE)


def write_full_range(path: Path, codec: str = "mjpeg") -> Written:
    """Full-range files with the colour patches (PATCHES) around the code, 25 frames at 25 fps.

    codec="mjpeg": Motion JPEG in AVI, `yuvj420p` (full range, BT.601 matrix, as JPEG/JFIF).
    codec="h264": H.264 `yuv420p` in MP4 flagged color_range=pc with BT.601 (bt470bg matrix and
    primaries, smpte170m transfer), the way Android phones write it.
    A correct decoder (full-range, BT.601 matrix) gives each patch's `rgb`; a decoder that takes the
    file for limited range stretches it (grey 16 -> 0, 235 -> 255, 64 -> ~56)."""
    if codec == "mjpeg":
        kw: dict[str, Any] = {"codec": "mjpeg", "fmt": "avi", "pix_fmt": "yuvj420p", "options": qscale(2)}
        tags = {"color_range": 2}
    elif codec == "h264":
        kw = {"codec": "libx264", "fmt": "mp4", "pix_fmt": "yuv420p", "options": X264_COLOUR}
        tags = {"color_range": 2, "colorspace": 5, "color_primaries": 5, "color_trc": 6}
    else:
        raise ValueError(f"codec is mjpeg or h264, not {codec}")
    _write_pyav(path, _images(25, SIZE, PATCHES), fps=25, yuv=("bt601", True), tags=tags, **kw)
    return Written(Path(path), _cfr_times(25, 25), SIZE, patches=tuple(PATCHES), tags=tags)


def write_10bit(path: Path, kind: str = "hevc") -> Written:
    """10-bit files with the colour patches around the code, 25 frames at 25 fps, limited range.

    kind="hevc": HEVC (libx265) `yuv420p10le` in MP4, BT.2020: matrix bt2020nc (9), primaries bt2020
    (9), transfer bt2020-10 (14), which is the BT.709 curve (SDR BT.2020, no PQ/HLG), so "correct" is
    well defined: a decoder applying the BT.2020 non-constant-luminance matrix at limited range gives
    each patch's `rgb` as R'G'B' in BT.2020 primaries (no gamut conversion to BT.709: a player that
    converts primaries gives other, less saturated, numbers on the colours; greys stay). Read with the
    BT.709 matrix, saturated colours move by up to 16 levels (cyan; red 13, green 11).
    kind="prores": ProRes 422 (prores_ks) `yuv422p10le` in MOV, BT.709 matrix, primaries and
    transfer (1, 1, 1): a correct decoder gives each patch's `rgb`."""
    if kind == "hevc":
        tags = {"color_range": 1, "colorspace": 9, "color_primaries": 9, "color_trc": 14}
        kw: dict[str, Any] = {
            "codec": "libx265",
            "fmt": "mp4",
            "pix_fmt": "yuv420p10le",
            "options": {"preset": "ultrafast", "crf": "8", "x265-params": "log-level=error"},
            "yuv": ("bt2020", False),
        }
    elif kind == "prores":
        tags = {"color_range": 1, "colorspace": 1, "color_primaries": 1, "color_trc": 1}
        kw = {"codec": "prores_ks", "fmt": "mov", "pix_fmt": "yuv422p10le", "yuv": ("bt709", False)}
    else:
        raise ValueError(f"kind is hevc or prores, not {kind}")
    _write_pyav(path, _images(25, SIZE, PATCHES), fps=25, tags=tags, **kw)
    return Written(Path(path), _cfr_times(25, 25), SIZE, patches=tuple(PATCHES), tags=tags)


def write_bt601(path: Path) -> Written:
    """Limited-range BT.601 H.264 in MP4 (matrix, primaries and transfer smpte170m: 6, 6, 6) with
    the colour patches; decoded with the BT.709 matrix the saturated patches move by > 10 levels."""
    tags = {"color_range": 1, "colorspace": 6, "color_primaries": 6, "color_trc": 6}
    _write_pyav(
        path, _images(25, SIZE, PATCHES), codec="libx264", fmt="mp4", pix_fmt="yuv420p", fps=25,
        options=X264_COLOUR, yuv=("bt601", False), tags=tags,
    )  # fmt: skip
    return Written(Path(path), _cfr_times(25, 25), SIZE, patches=tuple(PATCHES), tags=tags)


def write_bt709(path: Path) -> Written:
    """Limited-range BT.709 H.264 in MP4 (matrix, primaries and transfer bt709: 1, 1, 1) with the
    colour patches; decoded with the BT.601 matrix the saturated patches move by > 10 levels."""
    tags = {"color_range": 1, "colorspace": 1, "color_primaries": 1, "color_trc": 1}
    _write_pyav(
        path, _images(25, SIZE, PATCHES), codec="libx264", fmt="mp4", pix_fmt="yuv420p", fps=25,
        options=X264_COLOUR, yuv=("bt709", False), tags=tags,
    )  # fmt: skip
    return Written(Path(path), _cfr_times(25, 25), SIZE, patches=tuple(PATCHES), tags=tags)


# The colour test sources (file name -> writer): the realworld tests and bench/colour_agreement.py.
COLOUR_SOURCES = {
    "full_mjpeg.avi": lambda p: write_full_range(p, codec="mjpeg"),
    "full_h264.mp4": lambda p: write_full_range(p, codec="h264"),
    "hevc10_bt2020.mp4": lambda p: write_10bit(p, kind="hevc"),
    "prores10_bt709.mov": lambda p: write_10bit(p, kind="prores"),
    "bt601.mp4": write_bt601,
    "bt709.mp4": write_bt709,
}


@functools.cache
def _ffmpeg_has_display_rotation() -> bool:
    out = subprocess.run([_need_ffmpeg(), "-hide_banner", "-h", "full"], capture_output=True, text=True)
    return "display_rotation" in out.stdout


def write_rotated(path: Path, degrees: int = 90, via: str = "pyav") -> Written:
    """H.264 in MP4 whose display matrix turns the stored picture by `degrees` (90, 180, 270)
    counter-clockwise: upright = np.rot90(decoded, degrees // 90). The upright picture is portrait
    120x160 (code upright in its central square); the stored one is np.rot90(upright, -degrees // 90)
    (160x120 for 90 and 270), 25 frames at 25 fps.

    Convention (measured 2026-12-04): the angle is counter-clockwise. PyAV 18.1 exposes it only on
    decoded frames, `frame.rotation` (from the DISPLAYMATRIX frame side data, range -180..180: 270
    reads -90, 180 reads -180); the stream has no side data or `rotate` tag in PyAV. ffprobe prints the
    same angle (`rotation=90`); ffmpeg's own autorotation turns the picture counter-clockwise by it.
    Phone portrait videos are commonly reported with -90 (turn clockwise; not measured here).
    via="pyav": PyAV's `stream.set_display_rotation(degrees)` (counter-clockwise).
    via="ffmpeg": PyAV writes the plain file, then `ffmpeg -display_rotation D -i plain -c copy`
    (FFmpeg >= 6; counter-clockwise) or, on Debian 12's FFmpeg 5.1 which lacks that option,
    `-c copy -metadata:s:v:0 rotate=D`, which there gives the same matrix (measured)."""
    if degrees not in (90, 180, 270):
        raise ValueError(f"degrees is 90, 180 or 270, not {degrees}")
    w, h = SIZE[1], SIZE[0]  # upright: portrait
    images = [np.ascontiguousarray(np.rot90(code_frame(i, w, h), -degrees // 90)) for i in range(25)]
    path = Path(path)
    if via == "pyav":
        _write_pyav(
            path,
            images,
            codec="libx264",
            fmt="mp4",
            pix_fmt="yuv420p",
            fps=25,
            options=X264,
            rotation=degrees,
        )
    elif via == "ffmpeg":
        plain = path.with_name(path.stem + ".plain.mp4")
        _write_pyav(plain, images, codec="libx264", fmt="mp4", pix_fmt="yuv420p", fps=25, options=X264)
        if _ffmpeg_has_display_rotation():
            _ffmpeg("-display_rotation", str(degrees), "-i", str(plain), "-c", "copy", "-f", "mp4", str(path))
        else:
            _ffmpeg(
                "-i", str(plain), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", "-f", "mp4", str(path)
            )
        plain.unlink()
    else:
        raise ValueError(f"via is pyav or ffmpeg, not {via}")
    return Written(path, _cfr_times(25, 25), (w, h), rotation=degrees)


def write_gif(path: Path) -> Written:
    """Animated GIF, 20 frames at 10 fps (GIF delays are in 1/100 s), rgb8 palette."""
    _write_pyav(path, _images(20, SIZE), codec="gif", fmt="gif", pix_fmt="rgb8", fps=10)
    return Written(Path(path), _cfr_times(10, 20), SIZE)


def write_animated_webp(path: Path) -> Written:
    """Animated WebP (PyAV's libwebp_anim encoder, webp muxer), 20 frames at 10 fps (100 ms each).
    Neither PyAV 18.1 (FFmpeg 8 libraries) nor Debian's FFmpeg 5.1 decode animated WebP: av.open
    succeeds (webp_pipe, width 0) and decoding raises InvalidDataError; Pillow reads it."""
    _write_pyav(
        path,
        _images(20, SIZE),
        codec="libwebp_anim",
        fmt="webp",
        pix_fmt="yuv420p",
        fps=10,
        options={"lossless": "0", "quality": "90"},
    )
    return Written(Path(path), _cfr_times(10, 20), SIZE)


def write_mpegts(path: Path) -> Written:
    """MPEG-2 video in MPEG-TS, 50 frames at 25 fps, muxed with max_delay 0.7 s as the ffmpeg CLI
    does: the stream starts at 1.44 s (without max_delay PyAV's muxer starts it at 0.04 s)."""
    _write_pyav(
        path,
        _images(50, SIZE),
        codec="mpeg2video",
        fmt="mpegts",
        pix_fmt="yuv420p",
        fps=25,
        options=qscale(3),
        container_options={"max_delay": "700000"},
    )
    return Written(Path(path), _cfr_times(25, 50), SIZE, start=1.44)


def write_m2ts(path: Path) -> Written:
    """H.264 in Blu-ray/AVCHD-style M2TS (mpegts muxer, mpegts_m2ts_mode=1: 192-byte packets),
    50 frames at 25 fps, max_delay 0.7 s: the stream starts at 1.48 s (x264's B-frame delay adds a
    frame to mpegts' 1.44 s)."""
    _write_pyav(
        path,
        _images(50, SIZE),
        codec="libx264",
        fmt="mpegts",
        pix_fmt="yuv420p",
        fps=25,
        options=X264,
        container_options={"mpegts_m2ts_mode": "1", "max_delay": "700000"},
    )
    return Written(Path(path), _cfr_times(25, 50), SIZE, start=1.48)


def write_flv(path: Path) -> Written:
    """Sorenson H.263 (flv1) in FLV, 50 frames at 25 fps."""
    _write_pyav(path, _images(50, SIZE), codec="flv", fmt="flv", pix_fmt="yuv420p", fps=25, options=qscale(3))
    return Written(Path(path), _cfr_times(25, 50), SIZE)


def write_3gp(path: Path) -> Written:
    """H.263 in 3GP at QCIF 176x144 (H.263 allows only its fixed sizes), 30 frames at 15 fps, at the
    encoder's default rate control: with a fixed quantiser (qscale 2 or 3) or 1 Mb/s libavcodec's
    h263 encoder (FFmpeg 8, in PyAV 18.1) writes P-frames with wrong blocks (any decoder, any
    container), which the codes show."""
    size = (176, 144)
    _write_pyav(path, _images(30, size), codec="h263", fmt="3gp", pix_fmt="yuv420p", fps=15)
    return Written(Path(path), _cfr_times(15, 30), size)


def write_mpg(path: Path) -> Written:
    """MPEG-1 video in an MPEG program stream (.mpg), 50 frames at 25 fps; the stream starts at
    0.54 s (the muxer's default delay)."""
    _write_pyav(
        path, _images(50, SIZE), codec="mpeg1video", fmt="mpeg", pix_fmt="yuv420p", fps=25, options=qscale(3)
    )
    return Written(Path(path), _cfr_times(25, 50), SIZE, start=0.54)


def write_ogv(path: Path) -> Written:
    """Theora in Ogg, 50 frames at 25 fps, by the ffmpeg CLI (PyAV 18.1's wheel has no libtheora
    encoder; it decodes Theora)."""
    _write_ffmpeg(
        path, _images(50, SIZE), 25, ["-c:v", "libtheora", "-q:v", "8", "-pix_fmt", "yuv420p", "-f", "ogg"]
    )
    return Written(Path(path), _cfr_times(25, 50), SIZE)


def write_wmv(path: Path) -> Written:
    """Windows Media Video 8 (wmv2) in ASF, 50 frames at 25 fps."""
    _write_pyav(
        path, _images(50, SIZE), codec="wmv2", fmt="asf", pix_fmt="yuv420p", fps=25, options=qscale(3)
    )
    return Written(Path(path), _cfr_times(25, 50), SIZE)


# Every container users bring, by short name: FORMATS[name](path) -> Written. The path's extension
# does not matter (the writers name the muxer); EXTENSIONS gives the usual one.
FORMATS: dict[str, Callable[[Path], Written]] = {
    "mp4_h264": functools.partial(write_cfr, container="mp4"),
    "mp4_vfr": write_vfr_mp4,
    "avi_mpeg4": functools.partial(write_cfr, codec="mpeg4", container="avi", options=qscale(3)),
    "webm_vp9": functools.partial(
        write_cfr,
        codec="libvpx-vp9",
        container="webm",
        options={"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"},
    ),
    "mkv_ffv1": functools.partial(write_cfr, codec="ffv1", container="matroska", pix_fmt="yuv444p"),
    "mkv_vfr": write_mkv_vfr,
    "avi_ms_vfr": write_avi_ms_timebase,
    "avi_mjpeg_full": write_full_range,
    "mp4_h264_full": functools.partial(write_full_range, codec="h264"),
    "mp4_hevc10_bt2020": write_10bit,
    "mov_prores10_bt709": functools.partial(write_10bit, kind="prores"),
    "mp4_bt601": write_bt601,
    "mp4_bt709": write_bt709,
    "mp4_rot90": functools.partial(write_rotated, degrees=90),
    "mp4_rot180": functools.partial(write_rotated, degrees=180),
    "mp4_rot270": functools.partial(write_rotated, degrees=270),
    "gif": write_gif,
    "webp_anim": write_animated_webp,
    "mpegts": write_mpegts,
    "m2ts": write_m2ts,
    "flv": write_flv,
    "3gp": write_3gp,
    "mpg": write_mpg,
    "ogv": write_ogv,
    "wmv": write_wmv,
}
EXTENSIONS = {
    "mp4_h264": ".mp4", "mp4_vfr": ".mp4", "avi_mpeg4": ".avi", "webm_vp9": ".webm", "mkv_ffv1": ".mkv",
    "mkv_vfr": ".mkv", "avi_ms_vfr": ".avi", "avi_mjpeg_full": ".avi", "mp4_h264_full": ".mp4",
    "mp4_hevc10_bt2020": ".mp4", "mov_prores10_bt709": ".mov", "mp4_bt601": ".mp4", "mp4_bt709": ".mp4",
    "mp4_rot90": ".mp4", "mp4_rot180": ".mp4", "mp4_rot270": ".mp4", "gif": ".gif", "webp_anim": ".webp",
    "mpegts": ".ts", "m2ts": ".m2ts", "flv": ".flv", "3gp": ".3gp", "mpg": ".mpg", "ogv": ".ogv", "wmv": ".wmv",
}  # fmt: skip
NEEDS_FFMPEG_CLI = {"ogv"}  # written by the ffmpeg command line tool
UNDECODABLE = {"webp_anim"}  # PyAV 18.1 opens it but cannot decode it (see write_animated_webp)


def write_format(name: str, folder: Path) -> Written:
    """FORMATS[name] written to folder/<name><usual extension>."""
    return FORMATS[name](Path(folder) / f"{name}{EXTENSIONS[name]}")


# ---------------------------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------------------------


def decode_frames(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


def facts(path: Path) -> dict[str, Any]:
    """What PyAV says about a file's first video stream, and what decoding it really gives."""
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        cc = stream.codec_context
        info: dict[str, Any] = {
            "format": container.format.name,
            "codec": cc.name,
            "pix_fmt": cc.pix_fmt,
            "size": (cc.width, cc.height),
            "header_frames": stream.frames,
            "average_rate": stream.average_rate,
            "base_rate": stream.base_rate,
            "guessed_rate": stream.guessed_rate,
            "time_base": stream.time_base,
            "start_time": stream.start_time,
            "start_s": None if stream.start_time is None else float(stream.start_time * stream.time_base),
            "duration_s": None if stream.duration is None else float(stream.duration * stream.time_base),
            "container_duration_s": None if container.duration is None else container.duration / av.time_base,
            "cc_color": (cc.color_range, cc.colorspace, cc.color_primaries, cc.color_trc),
        }
        try:
            frames = list(container.decode(stream))
        except av.error.FFmpegError as err:
            info["decode_error"] = f"{type(err).__name__}: {err}"
            frames = []
    info["decoded_frames"] = len(frames)
    if frames:
        f = frames[0]
        info["frame_format"] = f.format.name
        info["frame_color"] = (f.color_range, f.colorspace, f.color_primaries, f.color_trc)
        info["rotation"] = f.rotation
        info["first_time"] = f.time
        info["times"] = [fr.time for fr in frames]
    return info
