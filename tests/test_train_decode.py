"""train.decoders: DALI (CPU here) and PyAV clip decoders on real VP9 clips cut by `lvmae ingest clips`."""

from __future__ import annotations

import gc
import importlib.util
import os
import tarfile

import numpy as np
import pytest
import torch

from ingest.clip_decode import CorruptClip, decode_clip
from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from train.decoders import (
    BatchBuffers,
    DaliClipDecoder,
    PyAVClipDecoder,
    make_clip_decoder,
    ships_uint8,
    video_to,
)

try:
    HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None
except ModuleNotFoundError:  # no nvidia namespace package at all
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")

T, S, B = 16, 64, 4
# The PyAV readers convert YUV to RGB as DALI does (ingest.clip_decode): identical on these clips
# (measured 2026-12-04: max |diff| 0). Before, they differed by a mean of 1.2-1.9 of 255 per clip, max 34.
MEAN_TOL, MAX_TOL = 0.01, 1
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


@needs_dali
def test_dali_cpu_uint8_decode_matches_pyav(clips, dali_u8):
    x, bad = dali_u8.decode(clips[:B])
    assert bad == [] and x.dtype == torch.uint8 and x.shape == (B, T, S, S, 3)
    ref, ref_bad = PyAVClipDecoder(T, S, uint8=True).decode(clips[:B])
    assert ref_bad == [] and ref.shape == x.shape
    diff = (x.int() - ref.int()).abs()
    assert diff.float().mean(dim=(1, 2, 3, 4)).max() < MEAN_TOL
    assert diff.max() <= MAX_TOL
    assert x.float().std() > 20  # real picture content, not a constant fill


@needs_dali
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


@needs_dali
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


@needs_dali
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


@needs_dali
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


@needs_dali
def test_wrong_clip_spec_is_reported_bad(clips):
    x, bad = DaliClipDecoder(T + 1, S, 2, device="cpu", uint8=True).decode(clips[:2])
    assert bad == [0, 1] and x.shape == (0, T + 1, S, S, 3)


@needs_dali
def test_make_clip_decoder():
    assert isinstance(make_clip_decoder("auto", T, S, B, device="cpu"), DaliClipDecoder)
    pyav = make_clip_decoder("pyav", T, S, B, device="cpu", uint8=True)
    assert isinstance(pyav, PyAVClipDecoder) and pyav.uint8
    pyav = make_clip_decoder("pyav", T, S, B, num_threads=1, device_id=0)
    assert pyav.helper is None and pyav.buffers.capacity == B
    with pytest.raises(ValueError, match="backend"):
        make_clip_decoder("opencv", T, S, B)


# ---- PyAVClipDecoder: frames straight into reused batch tensors ------------------------------------------


def reference(clips: list[bytes], normalize=None, dtype=torch.float32) -> torch.Tensor:
    """What PyAVClipDecoder returned before it converted frame by frame into reused buffers: decode_clip,
    a fresh tensor, a permuting copy, then x * (1 / (255 s)) - m / s in place, in `dtype`."""
    mean, std = normalize or ((0.0,) * 3, (1.0,) * 3)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1, 1).to(dtype)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1, 1).to(dtype)
    x = torch.from_numpy(np.stack([decode_clip(c, T) for c in clips])).permute(0, 4, 1, 2, 3).to(dtype)
    return x.mul_(scale).sub_(shift)


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(
    "normalize,dtype",
    [(None, torch.float32), (IMAGENET, torch.float32), (IMAGENET, torch.float16), (IMAGENET, torch.bfloat16)],
)
def test_pyav_float_is_bit_for_bit_the_reference_conversion(clips, normalize, dtype, num_threads):
    decoder = PyAVClipDecoder(T, S, normalize=normalize, dtype=dtype, batch_size=B, num_threads=num_threads)
    for part in (clips[:B], clips[B:]):  # the second batch goes into the same buffer
        x, bad = decoder.decode(part)
        assert bad == [] and x.dtype == dtype and x.shape == (B, 3, T, S, S) and x.is_contiguous()
        assert torch.equal(x, reference(part, normalize, dtype))
        del x
    assert decoder.buffers.allocated == 1 and decoder.buffers.reused == 1


def test_pyav_uint8_is_decode_clip(clips):
    decoder = PyAVClipDecoder(T, S, uint8=True, batch_size=B)
    x, bad = decoder.decode(clips[:B])
    assert bad == [] and x.dtype == torch.uint8 and x.shape == (B, T, S, S, 3)
    assert torch.equal(x, torch.from_numpy(np.stack([decode_clip(c, T) for c in clips[:B]])))


@pytest.mark.parametrize("uint8", [False, True])
def test_pyav_held_batches_are_never_overwritten(clips, uint8):
    """Whatever a consumer keeps of a batch (the tensor, a view of one clip, a numpy array, the storage
    object) stays as it was while later batches decode; a buffer comes back once all of that is gone."""
    decoder = PyAVClipDecoder(T, S, uint8=uint8, batch_size=2, num_threads=2, pool=4)
    parts = [clips[0:2], clips[2:4], clips[4:6], clips[6:8]]
    keeps = {
        "tensor": lambda x: x,
        "view": lambda x: x[1],
        "numpy": lambda x: x.numpy(),
        "storage": lambda x: x.untyped_storage(),
    }
    kept, copies, ptrs = {}, {}, []
    for part, (name, keep) in zip(parts, keeps.items()):
        x, _ = decoder.decode(part)
        kept[name], copies[name] = keep(x), x.clone()
        ptrs.append(x.data_ptr())
        del x
    assert len(set(ptrs)) == 4 and len(decoder.buffers.buffers) == 4  # all four are pooled buffers
    for _ in range(2):  # every pooled buffer is held: later batches get fresh tensors
        for part in parts:
            decoder.decode(part)
    assert decoder.buffers.reused == 0
    assert torch.equal(kept["tensor"], copies["tensor"])
    assert torch.equal(kept["view"], copies["view"][1])
    assert torch.equal(torch.from_numpy(kept["numpy"]), copies["numpy"])
    raw = torch.empty(0, dtype=torch.uint8).set_(kept["storage"])[: copies["storage"].nbytes]
    assert torch.equal(raw, copies["storage"].view(-1).view(torch.uint8))

    del kept["tensor"], kept["storage"], raw  # raw, a tensor on that storage, held it too
    gc.collect()
    x, _ = decoder.decode(parts[3])
    y, _ = decoder.decode(parts[2])
    assert decoder.buffers.reused == 2 and {x.data_ptr(), y.data_ptr()} == {ptrs[0], ptrs[3]}
    assert torch.equal(x, decoder.decode(parts[3])[0])  # x and y held: the third call used neither
    assert torch.equal(kept["view"], copies["view"][1]) and np.array_equal(kept["numpy"], copies["numpy"])


@pytest.mark.parametrize("uint8", [False, True])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_pyav_bad_clips_partial_and_empty_batches(clips, uint8, num_threads):
    decoder = PyAVClipDecoder(T, S, uint8=uint8, batch_size=B, num_threads=num_threads)

    def alone(i: int) -> torch.Tensor:
        return decoder.decode([clips[i]])[0][0].clone()

    batch = [clips[0], os.urandom(3000), clips[1], b"", clips[2], clips[3][: len(clips[3]) // 2]]
    batch += [clips[3][:-50], clips[3]]
    x, bad = decoder.decode(batch)  # more clips than batch_size: a larger buffer
    assert bad == [1, 3, 5, 6] and x.shape[0] == 4
    for j, i in enumerate([0, 1, 2, 3]):
        assert torch.equal(x[j], alone(i))
    del x
    for start, stop in ((4, 7), (7, 8)):  # short last batches
        x, bad = decoder.decode(clips[start:stop])
        assert bad == [] and x.shape[0] == stop - start
        assert torch.equal(x, torch.stack([alone(i) for i in range(start, stop)]))
    empty, bad = decoder.decode([])
    assert bad == [] and empty.shape == (0, *decoder.sample_shape) and empty.dtype == decoder.dtype
    x, bad = decoder.decode([b"", os.urandom(100)])  # nothing good
    assert bad == [0, 1] and x.shape[0] == 0
    assert PyAVClipDecoder(T + 1, S, uint8=uint8).decode(clips[:2])[1] == [0, 1]  # wrong frame count
    assert PyAVClipDecoder(T, S + 1, uint8=uint8).decode(clips[:2])[1] == [0, 1]  # wrong frame size


def test_batch_buffers_reuse_only_free_buffers():
    pool = BatchBuffers((2, 3), torch.float32, size=2, capacity=4)
    a = pool.take(4)[:4]  # handed out as a view, as the decoder does: the view marks the buffer held
    b = pool.take(4)[:1]
    assert b.data_ptr() != a.data_ptr() and pool.allocated == 2
    a_ptr = a.data_ptr()
    del a
    a = pool.take(2)[:2]
    assert a.data_ptr() == a_ptr and pool.reused == 1  # free again: the pool's own reference does not count
    c = pool.take(4)[:4]  # both pooled buffers held: a fresh one that the pool does not keep
    assert pool.allocated == 3 and len(pool.buffers) == 2 and c.data_ptr() not in (a_ptr, b.data_ptr())
    big = pool.take(6)[:6]
    assert big.shape == (6, 2, 3) and pool.capacity == 6 and len(pool.buffers) == 1  # 4-row ones forgotten
    assert a.shape == (2, 2, 3) and b.shape == (1, 2, 3)  # still theirs


def test_decode_clip_into_an_array(clips):
    whole = decode_clip(clips[0], T)
    out = np.zeros((T + 2, S, S, 3), np.uint8)
    got = decode_clip(clips[0], T, out=out)
    assert np.shares_memory(got, out) and got.shape == whole.shape and np.array_equal(got, whole)
    with pytest.raises(CorruptClip, match=f"{T // 2 + 1}\\+ frames"):  # more frames than out holds
        decode_clip(clips[0], out=np.zeros((T // 2, S, S, 3), np.uint8))
    with pytest.raises(CorruptClip, match="shape"):
        decode_clip(clips[0], out=np.zeros((T, S, S + 1, 3), np.uint8))
    with pytest.raises(CorruptClip, match="expected 8"):
        decode_clip(clips[0], 8, out=out)
    with pytest.raises(CorruptClip):
        decode_clip(b"garbage", out=out)


def test_uint8_batches_converted_on_the_device_give_the_float_batches(clips):
    """The trainer's PyAV path on CUDA: uint8 batches shipped and converted there by video_to, with the
    values the decoder's float path gives (here on the CPU: the same ops)."""
    u8, _ = PyAVClipDecoder(T, S, uint8=True).decode(clips[:2])
    floats, _ = PyAVClipDecoder(T, S).decode(clips[:2])
    for dtype in (torch.float32, torch.bfloat16):
        x = video_to(u8, torch.device("cpu"), dtype)
        assert x.shape == (2, 3, T, S, S) and x.dtype == dtype and x.is_contiguous()
        assert torch.equal(x, floats.to(dtype))
    assert torch.equal(video_to(floats, torch.device("cpu"), torch.bfloat16), floats.to(torch.bfloat16))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert ships_uint8("pyav", cuda) and not ships_uint8("pyav", cpu) and not ships_uint8("dali", cuda)
    assert ships_uint8("auto", cuda) == (not HAVE_DALI)
