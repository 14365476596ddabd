"""The decode stage of the training loader: a batch of encoded clips -> one tensor, bad clips reported.

Both decoders share one API: `decode(list of clip bytes) -> (tensor, bad_indices)`. The tensor holds the
clips that decoded to exactly num_frames x size x size, in batch order, as float (B, 3, T, H, W) with
`(x / 255 - mean) / std` per channel (just x / 255 when normalize is None), or as uint8 (B, T, H, W, 3)
with uint8=True. bad_indices lists the positions in the input batch of clips that failed.

DaliClipDecoder is the loader's decoder: NVDEC on a GPU ('mixed'), libavcodec on CPU (VP8, VP9, MJPEG
only). PyAVClipDecoder (ingest.clip_decode, the reference path) serves machines without DALI; it reuses its
batch tensors (BatchBuffers) once nothing refers to them any more.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

from ingest.clip_decode import CorruptClip, decode_clip, decode_frames

Normalize = tuple[Sequence[float], Sequence[float]] | None


def _check_normalize(normalize: Normalize) -> tuple[list[float], list[float]]:
    """-> (mean, std) per channel on the [0, 1] scale; (0, 1) when normalize is None."""
    mean, std = normalize if normalize is not None else ([0.0] * 3, [1.0] * 3)
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalize needs 3 means and 3 positive stds, got {normalize!r}")
    return mean, std


class DaliClipDecoder:
    """Decodes clip bytes with one DALI pipeline, built once: external_source -> decoders.video ->
    crop_mirror_normalize (cast, normalize and FHWC -> CFHW in one pass; skipped when uint8=True).

    device: "auto" (gpu if torch.cuda.is_available()), "cpu" or "gpu". On "gpu" the video decoder runs
    as 'mixed' (bytes on the host, NVDEC, frames on device_id) and the tensor comes back on
    cuda:device_id. The GPU path follows DALI's documented API but has not run on this project's
    CPU-only machines: check it (tests/test_train_decode.py) on the first machine with a GPU.

    The batch tensor is handed over zero-copy through DLPack when the pipeline uses DALI's dynamic
    executor (the default in DALI 2.x, which does not recycle output buffers), else copied.
    A batch smaller than batch_size (the last one) is fine; a larger one raises ValueError.
    The decoder reads every frame of a clip; a clip of any other shape than num_frames x size x size
    (a truncated clip decodes to fewer frames without an error) is reported bad, as decode_clip does.
    DALI fails a whole batch when one clip does not decode: the batch is then decoded clip by clip.
    """

    def __init__(
        self,
        num_frames: int,
        size: int,
        batch_size: int,
        num_threads: int = 2,
        device: str = "auto",
        device_id: int = 0,
        normalize: Normalize = None,
        dtype: torch.dtype = torch.float32,
        uint8: bool = False,
    ):
        from nvidia.dali import fn, pipeline_def, types

        if device == "auto":
            device = "gpu" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        dali_dtypes = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}
        if not uint8 and dtype not in dali_dtypes:
            raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
        mean, std = _check_normalize(normalize)
        self.num_frames, self.size, self.batch_size = num_frames, size, batch_size
        self.uint8, self.dtype = uint8, torch.uint8 if uint8 else dtype
        self.sample_shape = (num_frames, size, size, 3) if uint8 else (3, num_frames, size, size)
        self.gpu = device == "gpu"
        self.device = torch.device("cuda", device_id) if self.gpu else torch.device("cpu")

        @pipeline_def(
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id if self.gpu else None,
            prefetch_queue_depth=1,  # run() is called synchronously, one batch at a time
        )
        def pipeline():
            encoded = fn.external_source(name="clips", dtype=types.UINT8, ndim=1, device="cpu")
            frames = fn.decoders.video(encoded, device="mixed" if self.gpu else "cpu")  # F,H,W,C uint8
            if uint8:
                return frames
            return fn.crop_mirror_normalize(  # (x - 255 m) / (255 s) == (x / 255 - m) / s
                frames,
                dtype=dali_dtypes[dtype],
                output_layout="CFHW",
                mean=[255.0 * m for m in mean],
                std=[255.0 * s for s in std],
            )

        self.pipe = pipeline()
        self.pipe.build()
        self.zero_copy = bool(getattr(self.pipe, "exec_dynamic", False))

    def decode(self, batch: Sequence[bytes]) -> tuple[torch.Tensor, list[int]]:
        """-> (tensor of the clips that decoded, in batch order; indices of those that did not)."""
        if len(batch) > self.batch_size:
            raise ValueError(f"batch of {len(batch)} clips exceeds batch_size={self.batch_size}")
        if not batch:
            return self._empty(0), []
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in batch]
        try:
            (out,) = self.pipe.run(clips=arrays)
        except RuntimeError as err:
            if not _is_decode_error(err):
                raise
            return self._decode_one_by_one(arrays)
        shapes = [tuple(shape) for shape in out.shape()]
        good = [i for i, shape in enumerate(shapes) if shape == self.sample_shape]
        bad = [i for i, shape in enumerate(shapes) if shape != self.sample_shape]
        if not bad and out.is_dense_tensor():
            return self._to_torch(out.as_tensor()), []
        result = self._empty(len(good))
        for j, i in enumerate(good):
            self._copy(out[i], result[j])
        return result, bad

    def _decode_one_by_one(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
        result, n, bad = self._empty(len(arrays)), 0, []
        for i, array in enumerate(arrays):
            try:
                (out,) = self.pipe.run(clips=[array])
            except RuntimeError as err:
                if not _is_decode_error(err):
                    raise
                bad.append(i)
                continue
            if tuple(out.shape()[0]) != self.sample_shape:
                bad.append(i)
                continue
            self._copy(out[0], result[n])
            n += 1
        return result[:n], bad

    def _empty(self, n: int) -> torch.Tensor:
        return torch.empty((n, *self.sample_shape), dtype=self.dtype, device=self.device)

    def _copy(self, tensor, dest: torch.Tensor) -> None:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        feed_ndarray(tensor, dest, cuda_stream=stream)

    def _to_torch(self, tensor) -> torch.Tensor:
        if not self.zero_copy:  # the static executor reuses its output buffers: copy out
            dest = self._empty(tensor.shape()[0])
            self._copy(tensor, dest)
            return dest
        if self.gpu:
            with torch.cuda.device(self.device):
                return torch.from_dlpack(tensor)
        return torch.from_dlpack(tensor)


def _is_decode_error(err: RuntimeError) -> bool:
    """DALI names the failing operator in its message; errors elsewhere (memory, CUDA) propagate."""
    return "decoders.video" in str(err)


def _holders(tensor: torch.Tensor) -> tuple[int, int] | None:
    """How much refers to the tensor's memory: the C++ references to its storage (every tensor and view
    on it, numpy arrays and DLPack capsules made from those) and the Python references to its storage
    object (which the first count does not see). None where this torch does not tell."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    storage = tensor.untyped_storage()
    return use_count(storage._cdata), sys.getrefcount(storage)


class BatchBuffers:
    """Batch tensors reused from one decode to the next, so that a batch does not cost a fresh allocation
    (first-touching 308 MB of new pages took longer than converting into them, docs/benchmarks.md).

    A buffer is handed out again only once nothing outside this pool refers to its memory: no tensor or
    view of it (a batch a consumer still holds, a clip sliced from one, a conversion still running), no
    numpy array, DLPack capsule or storage object made from it (see _holders). Memory reached only through
    a raw pointer (data_ptr) is not seen. The pool keeps up to `size` buffers, of the largest batch asked
    for; while all of them are held, batches get fresh tensors that the pool does not keep. Where torch
    cannot count references, nothing is reused.
    """

    def __init__(self, sample_shape: tuple[int, ...], dtype: torch.dtype, size: int = 8, capacity: int = 1):
        self.sample_shape, self.dtype, self.size, self.capacity = sample_shape, dtype, size, capacity
        self.buffers: list[tuple[torch.Tensor, tuple[int, int]]] = []  # (buffer, its _holders when idle)
        self.reused = self.allocated = 0

    def take(self, n: int) -> torch.Tensor:
        """-> a (capacity >= n, *sample_shape) tensor that nothing else refers to; write, then hand out a
        view of it (the view is what marks it as held)."""
        if n > self.capacity:  # smaller buffers are forgotten (their holders free them)
            self.capacity = n
            self.buffers = [(b, idle) for b, idle in self.buffers if b.shape[0] >= n]
        for buf, idle in self.buffers:
            if _holders(buf) == idle:
                self.reused += 1
                return buf
        buf = torch.empty((self.capacity, *self.sample_shape), dtype=self.dtype)
        self.allocated += 1
        idle = _holders(buf)
        if idle is not None and len(self.buffers) < self.size:
            self.buffers.append((buf, idle))
        return buf


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # float dtypes as same-size integers for numpy


class PyAVClipDecoder:
    """The same API on ingest.clip_decode (PyAV, CPU; frames as decode_clip makes them), for machines without
    DALI (macOS).

    Frames go straight into their slots of the batch tensor, without decode_clip's stacked copy. Float
    output is converted in one pass per frame through a table of each channel's 256 values, computed with
    the same torch ops the whole tensor used to go through ((x * (1 / (255 s))) - m / s in `dtype`), so
    the values are the same bit for bit. With num_threads >= 2, a helper thread converts one clip while the
    next decodes (PyAV and numpy release the GIL); num_threads=1 converts inline. Batch tensors are reused
    (BatchBuffers, up to `pool` of them): one a consumer still refers to is never written to.
    """

    def __init__(
        self,
        num_frames: int,
        size: int,
        normalize: Normalize = None,
        dtype: torch.dtype = torch.float32,
        uint8: bool = False,
        batch_size: int = 1,
        num_threads: int = 2,
        pool: int = 8,
    ):
        mean, std = _check_normalize(normalize)
        if not uint8 and (not dtype.is_floating_point or dtype.itemsize not in _BITS):
            raise ValueError(f"dtype must be a 16, 32 or 64-bit floating point dtype, got {dtype}")
        self.num_frames, self.size = num_frames, size
        self.uint8, self.dtype = uint8, torch.uint8 if uint8 else dtype
        self.sample_shape = (num_frames, size, size, 3) if uint8 else (3, num_frames, size, size)
        self.buffers = BatchBuffers(self.sample_shape, self.dtype, pool, batch_size)
        # (x / 255 - m) / s == x * scale - shift, in `dtype`, as it was done in place on the batch tensor
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1, 1)
        self.bits = torch.uint8 if uint8 else _BITS[dtype.itemsize]
        self.table = None if uint8 else self._table()
        self.helper = (
            ThreadPoolExecutor(1, thread_name_prefix="lvmae-pyav-convert")
            if num_threads >= 2 and not uint8
            else None
        )

    def decode(self, batch: Sequence[bytes]) -> tuple[torch.Tensor, list[int]]:
        if not batch:
            return torch.empty((0, *self.sample_shape), dtype=self.dtype), []
        out = self.buffers.take(len(batch))
        slots = out.view(self.bits).numpy()  # the batch tensor's memory, as integers numpy can copy
        n, bad, pending = 0, [], None
        try:
            for i, data in enumerate(batch):
                if self.uint8:
                    try:
                        decode_clip(data, self.num_frames, out=slots[n])
                    except CorruptClip:
                        bad.append(i)
                        continue
                    n += 1
                    continue
                try:
                    frames = decode_frames(data, self.num_frames)
                except CorruptClip:
                    frames = []
                if not frames or any(f.shape != (self.size, self.size, 3) for f in frames):
                    bad.append(i)
                    continue
                if self.helper is None:
                    self._convert(frames, slots[n])
                else:
                    if pending is not None:
                        pending.result()  # one clip converting while the next decodes, no more
                    pending = self.helper.submit(self._convert, frames, slots[n])
                n += 1
            if pending is not None:
                pending.result()
        finally:  # never leave a conversion writing into a buffer after an error
            if pending is not None:
                wait([pending])
        if n == 0:  # not a view that would keep a whole buffer held
            return torch.empty((0, *self.sample_shape), dtype=self.dtype), bad
        return out[:n], bad

    def _table(self) -> np.ndarray:
        """(3, 256): channel c of value v -> the bits of its output, x * scale - shift in `dtype`."""
        table = torch.empty((3, 256), dtype=self.dtype)
        table.copy_(torch.arange(256, dtype=torch.uint8).expand(3, 256))
        table.mul_(self.scale.to(self.dtype).view(3, 1)).sub_(self.shift.to(self.dtype).view(3, 1))
        return table.view(self.bits).numpy()

    def _convert(self, frames: list[np.ndarray], slot: np.ndarray) -> None:
        """(T of (H, W, 3) uint8 frames) -> slot (3, T, H, W), through the per-channel table."""
        for t, frame in enumerate(frames):
            for c in range(3):
                np.take(self.table[c], frame[:, :, c], out=slot[c, t], mode="wrap")  # wrap: no index check


def resolve_backend(backend: str) -> str:
    """The decoder backend a name means: "auto" is "dali" where DALI is installed, else "pyav"."""
    if backend == "auto":
        try:
            import nvidia.dali  # noqa: F401

            return "dali"
        except ImportError:
            return "pyav"
    return backend


def ships_uint8(backend: str, device: torch.device) -> bool:
    """Whether a training loader should hand over uint8 clips, converted on `device` by video_to: with
    the PyAV decoder (which converts on the CPU) and a CUDA device (4x fewer bytes to copy over)."""
    return device.type == "cuda" and resolve_backend(backend) == "pyav"


def video_to(video: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch's clips on `device` in `dtype`, (B, 3, T, H, W). Float batches are moved (and cast); uint8
    ones (B, T, H, W, 3) are moved as uint8 and converted there: x * (1 / 255) in float32, as the decoders
    compute it with normalize=None (the same values), then cast to dtype."""
    if video.dtype != torch.uint8:
        return video.to(device, dtype, non_blocking=True)
    x = video.to(device, non_blocking=True).permute(0, 4, 1, 2, 3).contiguous().to(torch.float32)
    return x.mul_(torch.tensor(1.0 / 255.0, dtype=torch.float32, device=device)).to(dtype)


def make_clip_decoder(
    backend: str, num_frames: int, size: int, batch_size: int, **kwargs
) -> DaliClipDecoder | PyAVClipDecoder:
    """backend: "dali", "pyav", or "auto" (DALI where it is installed)."""
    backend = resolve_backend(backend)
    if backend == "dali":
        return DaliClipDecoder(num_frames, size, batch_size, **kwargs)
    if backend == "pyav":
        kwargs = {k: v for k, v in kwargs.items() if k in ("normalize", "dtype", "uint8", "num_threads")}
        return PyAVClipDecoder(num_frames, size, batch_size=batch_size, **kwargs)
    raise ValueError(f"decoder backend must be 'auto', 'dali' or 'pyav', got {backend!r}")
