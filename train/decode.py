"""The decode stage of the training loader: a batch of encoded clips -> one tensor, bad clips reported.

Both decoders share one API: `decode(list of clip bytes) -> (tensor, bad_indices)`. The tensor holds the
clips that decoded to exactly num_frames x size x size, in batch order, as float (B, 3, T, H, W) with
`(x / 255 - mean) / std` per channel (just x / 255 when normalize is None), or as uint8 (B, T, H, W, 3)
with uint8=True. bad_indices lists the positions in the input batch of clips that failed.

DaliClipDecoder is the loader's decoder: NVDEC on a GPU ('mixed'), libavcodec on CPU (VP8, VP9, MJPEG
only). PyAVClipDecoder (ingest.decode.decode_clip, the reference path) serves machines without DALI.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ingest.decode import CorruptClip, decode_clip

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


class PyAVClipDecoder:
    """The same API on ingest.decode.decode_clip (PyAV, CPU), for machines without DALI (macOS)."""

    def __init__(
        self,
        num_frames: int,
        size: int,
        normalize: Normalize = None,
        dtype: torch.dtype = torch.float32,
        uint8: bool = False,
    ):
        mean, std = _check_normalize(normalize)
        self.num_frames, self.size = num_frames, size
        self.uint8, self.dtype = uint8, torch.uint8 if uint8 else dtype
        self.sample_shape = (num_frames, size, size, 3) if uint8 else (3, num_frames, size, size)
        # (x / 255 - m) / s == x * scale - shift, done in place on the batch tensor
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1, 1)

    def decode(self, batch: Sequence[bytes]) -> tuple[torch.Tensor, list[int]]:
        result, n, bad = torch.empty((len(batch), *self.sample_shape), dtype=self.dtype), 0, []
        for i, data in enumerate(batch):
            try:
                clip = torch.from_numpy(decode_clip(data, self.num_frames))
            except CorruptClip:
                clip = None
            if clip is None or clip.shape != (self.num_frames, self.size, self.size, 3):
                bad.append(i)
                continue
            result[n].copy_(clip if self.uint8 else clip.permute(3, 0, 1, 2))
            n += 1
        if not self.uint8:
            result[:n].mul_(self.scale.to(self.dtype)).sub_(self.shift.to(self.dtype))
        return result[:n], bad


def make_clip_decoder(
    backend: str, num_frames: int, size: int, batch_size: int, **kwargs
) -> DaliClipDecoder | PyAVClipDecoder:
    """backend: "dali", "pyav", or "auto" (DALI where it is installed)."""
    if backend == "auto":
        try:
            import nvidia.dali  # noqa: F401

            backend = "dali"
        except ImportError:
            backend = "pyav"
    if backend == "dali":
        return DaliClipDecoder(num_frames, size, batch_size, **kwargs)
    if backend == "pyav":
        kwargs = {k: v for k, v in kwargs.items() if k in ("normalize", "dtype", "uint8")}
        return PyAVClipDecoder(num_frames, size, **kwargs)
    raise ValueError(f"decoder backend must be 'auto', 'dali' or 'pyav', got {backend!r}")
