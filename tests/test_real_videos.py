"""The helpers of real_videos.py: frame codes read back (and only upright), and every writer's file
opens in PyAV and shows the codes 0..N-1 in order, at the times, in the colours and with the colour
tags and rotation the writer meant."""

from __future__ import annotations

import io
import itertools
import shutil
import subprocess

import av
import numpy as np
import pytest
from real_videos import (
    EXTENSIONS,
    FORMATS,
    MAX_CODE,
    NEEDS_FFMPEG_CLI,
    PATCHES,
    UNDECODABLE,
    Written,
    code_frame,
    decode_frames,
    facts,
    read_code,
    read_code_any_rotation,
    read_patches,
    upright,
    write_format,
    write_rotated,
)

NO_FFMPEG = "the ffmpeg command line tool is not installed (it writes Theora and the CLI-rotated files)"
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason=NO_FFMPEG)


def _param(name: str):
    return pytest.param(name, marks=needs_ffmpeg) if name in NEEDS_FFMPEG_CLI else name


ALL = [_param(n) for n in FORMATS]
DECODABLE = [_param(n) for n in FORMATS if n not in UNDECODABLE]
COLOUR = [
    n for n in FORMATS if n.startswith(("avi_mjpeg", "mp4_h264_full", "mp4_hevc", "mov_prores", "mp4_bt"))
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("real_videos")


@pytest.fixture(scope="module")
def written(folder):
    cache: dict[str, Written] = {}

    def get(name: str) -> Written:
        if name not in cache:
            cache[name] = write_format(name, folder)
        return cache[name]

    return get


def rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


# --- frame codes -------------------------------------------------------------------------------------


def test_codes_read_back_from_the_frame_and_its_central_square():
    for n in [*range(0, MAX_CODE + 1, 7), MAX_CODE]:
        img = code_frame(n, 160, 120)
        assert read_code(img) == n
        assert read_code(img[:, 20:140]) == n  # the ingest's centre crop
    with pytest.raises(ValueError):
        code_frame(MAX_CODE + 1, 160, 120)


def test_turned_mirrored_blank_and_noise_pictures_do_not_read():
    rng = np.random.default_rng(0)
    for n in [0, 1, 7, 100, 1234, 2048, 4095, *rng.integers(0, 4096, 40).tolist()]:
        img = code_frame(n, 120, 120)
        for k in (1, 2, 3):
            assert read_code(np.rot90(img, k)) is None, (n, k)
            assert read_code_any_rotation(np.rot90(img, k)) == (n, (360 - 90 * k) % 360)
        for mirrored in (img[:, ::-1], img[::-1], img.transpose(1, 0, 2), np.rot90(img, 1)[::-1]):
            assert read_code(mirrored) is None and read_code_any_rotation(mirrored) is None
    assert read_code(np.full((64, 64, 3), 128, np.uint8)) is None
    assert read_code(np.zeros((64, 64, 3), np.uint8)) is None
    for _ in range(50):
        assert read_code(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is None


def _encode(frames: list[np.ndarray], codec: str, options: dict[str, str], fmt: str) -> bytes:
    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=25, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


@pytest.mark.parametrize("size", [64, 32])
def test_codes_survive_h264_then_the_ingest_scale_crop_and_vp9_crf32(size):
    """The ingest's path: H.264 source -> short side to `size` (area) -> centre crop -> VP9 crf 32.
    (All 4096 codes were checked this way at 32 and 64 px from 160x120, 128x96 and 176x144.)"""
    codes = [(i * 1237 + 5) % 4096 for i in range(96)] + [0, 4095]
    src = _encode(
        [code_frame(n, 160, 120) for n in codes], "libx264", {"crf": "18", "preset": "veryfast"}, "mp4"
    )
    with av.open(io.BytesIO(src)) as c:
        graph = av.filter.Graph()
        buffer = graph.add_buffer(template=c.streams.video[0])
        width = round(160 * size / 120)
        chain = [
            buffer,
            graph.add("scale", f"{width + width % 2}:{size}:flags=area"),
            graph.add("crop", f"{size}:{size}"),
        ]
        chain += [graph.add("format", "yuv420p"), graph.add("buffersink")]
        for a, b in itertools.pairwise(chain):
            a.link_to(b)
        graph.configure()
        small = []
        for frame in c.decode(video=0):
            graph.push(frame)
            small.append(rgb(graph.pull()))
    vp9 = {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "32", "b": "0"}
    with av.open(io.BytesIO(_encode(small, "libvpx-vp9", vp9, "webm"))) as c:
        clips = [rgb(f) for f in c.decode(video=0)]
    assert [read_code(img) for img in clips] == codes
    assert all(read_code(np.rot90(img, 1)) is None for img in clips)


# --- writers -----------------------------------------------------------------------------------------


def test_the_tables_agree():
    assert set(EXTENSIONS) == set(FORMATS)
    assert set(FORMATS) >= UNDECODABLE | NEEDS_FFMPEG_CLI


@pytest.mark.parametrize("name", DECODABLE)
def test_file_shows_its_codes_in_order_at_the_written_times(name, written):
    w = written(name)
    frames = decode_frames(w.path)
    pictures = [upright(rgb(f), f.rotation) for f in frames]
    assert [read_code(p) for p in pictures] == list(range(w.frames))
    assert pictures[0].shape[1::-1] == w.size
    times = [f.time for f in frames]
    assert times[0] == pytest.approx(w.start, abs=1e-3)
    assert [t - times[0] for t in times] == pytest.approx(w.times, abs=1e-3)


def test_animated_webp_is_written_but_pyav_cannot_decode_it(written):
    w = written("webp_anim")
    with av.open(str(w.path)) as c:  # opens: webp_pipe, one packet, no size
        assert c.format.name == "webp_pipe" and c.streams.video[0].codec_context.width == 0
        with pytest.raises(av.error.InvalidDataError):
            list(c.decode(video=0))
    image = pytest.importorskip("PIL.Image")
    with image.open(w.path) as im:
        assert im.n_frames == w.frames
        codes, durations = [], []
        for i in range(im.n_frames):
            im.seek(i)
            codes.append(read_code(np.asarray(im.convert("RGB"))))
            durations.append(im.info["duration"])
    assert codes == list(range(w.frames))
    assert durations == [round(1000 * (b - a)) for a, b in zip(w.times, w.times[1:])] + [100]


@pytest.mark.parametrize("name", COLOUR)
def test_colour_files_carry_their_tags_and_patch_colours(name, written):
    w = written(name)
    frame = decode_frames(w.path)[3]
    assert {k: getattr(frame, k) for k in w.tags} == w.tags
    got = np.array(read_patches(rgb(frame), w.patches))
    want = np.array([p.rgb for p in w.patches])
    assert np.abs(got - want).max() <= 6  # PyAV converts by the frame's tags (measured: <= 4)
    if name in ("avi_mjpeg_full", "mp4_h264_full"):
        # really full range: black and white patches are luma 0 and 255 (limited: 16 and 235)
        luma = frame.to_ndarray(format="gray")[..., None]
        levels = dict(zip([p.name for p in PATCHES], read_patches(luma, w.patches)))
        assert levels["grey0"][0] <= 2 and levels["grey255"][0] >= 253
    else:
        wrong = {1: "ITU601", 6: "ITU709", 9: "ITU709"}[w.tags["colorspace"]]
        moved = np.array(
            read_patches(frame.reformat(format="rgb24", src_colorspace=wrong).to_ndarray(), w.patches)
        )
        shift = dict(zip([p.name for p in w.patches], np.abs(moved - want).max(axis=1)))
        assert max(shift[c] for c in ("red", "green", "blue", "yellow", "cyan", "magenta")) > 10
        assert max(shift[f"grey{g}"] for g in (0, 16, 64, 128, 192, 235, 255)) <= 4  # greys: any matrix


@pytest.mark.parametrize("degrees", [90, 180, 270])
@pytest.mark.parametrize("via", ["pyav", pytest.param("ffmpeg", marks=needs_ffmpeg)])
def test_rotated_file_reads_upright_only_after_its_display_matrix(degrees, via, folder):
    w = write_rotated(folder / f"rot{degrees}_{via}.mp4", degrees, via=via)
    assert w.rotation == degrees
    frames = decode_frames(w.path)
    assert {f.rotation % 360 for f in frames} == {degrees}  # PyAV: -180..180, counter-clockwise
    stored = [rgb(f) for f in frames]
    assert all(read_code(p) is None for p in stored)
    assert [read_code(upright(p, f.rotation)) for p, f in zip(stored, frames)] == list(range(w.frames))
    assert [read_code_any_rotation(p) for p in stored[:3]] == [(i, degrees) for i in range(3)]
    if shutil.which("ffprobe"):
        out = subprocess.run(
            ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream_side_data=side_data_type,rotation", "-of", "compact", str(w.path)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "Display Matrix" in out and int(out.split("rotation=")[1].split()[0]) % 360 == degrees


def test_avi_on_a_millisecond_time_base_counts_empty_slots_in_its_header(written):
    w = written("avi_ms_vfr")
    f = facts(w.path)
    assert f["decoded_frames"] == w.frames == 35
    assert f["header_frames"] == round(1000 * w.times[-1]) + 1 == 1401  # every 1 ms slot to the last frame


@pytest.mark.parametrize("name", ALL)
def test_header_facts_as_the_module_docstring_records(name, written):
    """A few facts the ingest's probe depends on (the full table is in real_videos.py)."""
    f = facts(written(name).path)
    expected = {
        "mkv_vfr": {"header_frames": 0, "average_rate": 1000},
        "webm_vp9": {"header_frames": 0},
        "mp4_vfr": {"header_frames": 70, "base_rate": 50},
        "mpegts": {"header_frames": 0, "start_s": 1.44},
        "m2ts": {"header_frames": 0, "start_s": 1.48},
        "mpg": {"start_s": 0.54},
        "ogv": {"average_rate": None, "guessed_rate": 25},
        "gif": {"header_frames": 20, "average_rate": 10},
        "webp_anim": {"format": "webp_pipe", "decoded_frames": 0},
        "mp4_h264_full": {"pix_fmt": "yuvj420p"},
        "avi_mjpeg_full": {"pix_fmt": "yuvj420p"},
    }.get(name, {})
    assert {k: f[k] for k in expected} == pytest.approx(expected)
