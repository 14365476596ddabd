"""train.decode: DALI (CPU here) and PyAV clip decoders on real VP9 clips cut by `lvmae ingest clips`."""

from __future__ import annotations

import os
import tarfile

import pytest
import torch

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from train.decode import DaliClipDecoder, PyAVClipDecoder, make_clip_decoder

pytest.importorskip("nvidia.dali")

T, S, B = 16, 64, 4
# DALI and PyAV convert YUV to RGB differently. Measured on these clips: mean |diff| per clip 1.2-1.9
# (0-255 scale), max 34; STACK.md saw max 57 on other clips.
MEAN_TOL, MAX_TOL = 3.0, 64
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def clips(sample_videos, tmp_path_factory) -> list[bytes]:
    """Eight 16x64x64 VP9 clips from bikes.mp4, read back from the first shard."""
    src = tmp_path_factory.mktemp("src")
    os.symlink(sample_videos["bikes"], src / "bikes.mp4")
    out = tmp_path_factory.mktemp("ds") / "ds"
    cfg = IngestConfig(clip=ClipSpec(num_frames=T, size=S), shard_clips=8)
    ingest_clips([str(src)], str(out), cfg, progress=False)
    with tarfile.open(out / "shards" / "shard-000000.tar") as tar:
        data = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".webm")]
    assert len(data) == 8
    return data


@pytest.fixture(scope="module")
def dali_u8() -> DaliClipDecoder:
    return DaliClipDecoder(T, S, B, device="cpu", uint8=True)


@pytest.fixture(scope="module")
def dali_float() -> DaliClipDecoder:
    return DaliClipDecoder(T, S, B, device="auto")


def test_dali_cpu_uint8_decode_matches_pyav(clips, dali_u8):
    x, bad = dali_u8.decode(clips[:B])
    assert bad == [] and x.dtype == torch.uint8 and x.shape == (B, T, S, S, 3)
    ref, ref_bad = PyAVClipDecoder(T, S, uint8=True).decode(clips[:B])
    assert ref_bad == [] and ref.shape == x.shape
    diff = (x.int() - ref.int()).abs()
    assert diff.float().mean(dim=(1, 2, 3, 4)).max() < MEAN_TOL
    assert diff.max() < MAX_TOL
    assert x.float().std() > 20  # real picture content, not a constant fill


def test_dali_float_layout_scale_and_pyav_agreement(clips, dali_u8, dali_float, monkeypatch):
    assert dali_float.device == torch.device("cpu")  # "auto" on a machine without CUDA
    x, bad = dali_float.decode(clips[:B])
    assert bad == [] and x.dtype == torch.float32 and x.shape == (B, 3, T, S, S)
    u8, _ = dali_u8.decode(clips[:B])
    torch.testing.assert_close(x, u8.permute(0, 4, 1, 2, 3).float() / 255, rtol=0, atol=1e-6)
    assert dali_float.zero_copy  # DALI 2.x: dynamic executor, batch handed over through DLPack
    again, _ = dali_float.decode(clips[B : 2 * B])
    assert not torch.equal(again, x) and torch.equal(x, dali_float.decode(clips[:B])[0])  # not overwritten
    monkeypatch.setattr(dali_float, "zero_copy", False)
    assert torch.equal(dali_float.decode(clips[:B])[0], x)
    ref, _ = PyAVClipDecoder(T, S).decode(clips[:B])
    assert ref.shape == x.shape and (x - ref).abs().mean() < MEAN_TOL / 255


def test_normalization(clips, dali_float):
    mean = torch.tensor(IMAGENET[0]).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET[1]).view(1, 3, 1, 1, 1)
    plain, _ = dali_float.decode(clips[:2])
    normed, bad = DaliClipDecoder(T, S, 2, device="cpu", normalize=IMAGENET).decode(clips[:2])
    assert bad == []
    torch.testing.assert_close(normed, (plain - mean) / std, rtol=0, atol=1e-5)
    ref_plain, _ = PyAVClipDecoder(T, S).decode(clips[:2])
    ref_normed, _ = PyAVClipDecoder(T, S, normalize=IMAGENET).decode(clips[:2])
    torch.testing.assert_close(ref_normed, (ref_plain - mean) / std, rtol=0, atol=1e-5)
    half, _ = DaliClipDecoder(T, S, 2, device="cpu", normalize=IMAGENET, dtype=torch.float16).decode(
        clips[:2]
    )
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), normed, rtol=0, atol=5e-3)


def test_short_last_batch_empty_batch_and_oversized_batch(clips, dali_u8):
    full, _ = dali_u8.decode(clips[:B])
    for part in (clips[4:7], clips[7:8]):
        x, bad = dali_u8.decode(part)
        assert bad == [] and x.shape == (len(part), T, S, S, 3)
    again, _ = dali_u8.decode(clips[:B])  # a full batch after short ones
    assert torch.equal(again, full)
    empty, bad = dali_u8.decode([])
    assert empty.shape == (0, T, S, S, 3) and bad == []
    with pytest.raises(ValueError, match="exceeds batch_size"):
        dali_u8.decode(clips[: B + 1])


def test_corrupt_clips_are_reported_and_good_ones_still_come_back(clips, dali_u8, monkeypatch):
    alone = [dali_u8.decode([c])[0][0] for c in clips[:4]]
    searches = []
    one_by_one = dali_u8._decode_one_by_one
    monkeypatch.setattr(dali_u8, "_decode_one_by_one", lambda a: searches.append(len(a)) or one_by_one(a))
    # Garbage bytes and an empty clip make DALI fail the batch: it is searched clip by clip.
    batch = [clips[0], os.urandom(3000), clips[1], b""]
    x, bad = dali_u8.decode(batch)
    assert searches == [4] and bad == [1, 3] and x.shape == (2, T, S, S, 3)
    assert torch.equal(x[0], alone[0]) and torch.equal(x[1], alone[1])
    # A truncated clip decodes without an error to fewer frames: dropped by its shape, no search.
    truncated = [clips[2], clips[3][: len(clips[3]) // 2], clips[3][:-50], clips[3]]
    x, bad = dali_u8.decode(truncated)
    assert searches == [4] and bad == [1, 2] and x.shape == (2, T, S, S, 3)
    assert torch.equal(x[0], alone[2]) and torch.equal(x[1], alone[3])
    # The pipeline survives the errors.
    x, bad = dali_u8.decode(clips[:B])
    assert bad == [] and torch.equal(x, torch.stack(alone))
    ref, ref_bad = PyAVClipDecoder(T, S, uint8=True).decode(batch + truncated)
    assert ref_bad == [1, 3, 5, 6] and ref.shape == (4, T, S, S, 3)


def test_wrong_clip_spec_is_reported_bad(clips):
    x, bad = DaliClipDecoder(T + 1, S, 2, device="cpu", uint8=True).decode(clips[:2])
    assert bad == [0, 1] and x.shape == (0, T + 1, S, S, 3)


def test_make_clip_decoder():
    assert isinstance(make_clip_decoder("auto", T, S, B, device="cpu"), DaliClipDecoder)
    pyav = make_clip_decoder("pyav", T, S, B, device="cpu", uint8=True)
    assert isinstance(pyav, PyAVClipDecoder) and pyav.uint8
    with pytest.raises(ValueError, match="backend"):
        make_clip_decoder("opencv", T, S, B)
