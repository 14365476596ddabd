"""One clip shard's work, wherever it runs (this process, a worker process, a Ray task).

write_shard(ShardTask) fetches the shard's sources (a remote one downloaded first, a store outage waited
out), cuts their clips, writes shards/shard-NNNNNN.tar (samples KEY.<ext> + KEY.json, byte-for-byte
deterministic), uploads it, then writes its completion record shards/shard-NNNNNN.json: the commit marker.
probe_source probes one source before planning. ingest.clips plans the shards and runs these.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from ingest import labels
from ingest.clip_plan import Clip, VideoInfo
from ingest.config import ClipSpec
from ingest.probe import BadVideo, probe
from ingest.retry import StoreRetry
from ingest.sources import Source
from ingest.storage import Store
from ingest.video import OUTPUT_COLOUR, clip_extension, cut_clips, sha256_hex


def shard_name(k: int) -> str:
    return f"shards/shard-{k:06d}"


def open_source(uri: str, storage_options: dict[str, Any]):
    """A path for local files (fastest for libav), else an fsspec file object."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if os.path.getsize(path) == 0:
            raise BadVideo("empty", "zero-byte file")
        return path
    import fsspec

    f = fsspec.open(uri, "rb", **storage_options).open()
    if f.size == 0:
        f.close()
        raise BadVideo("empty", "zero-byte file")
    return f


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def fetch_source(uri: str, storage_options: dict[str, Any], tmp: str, retry: StoreRetry) -> str:
    """A local path to decode `uri` from: itself if local, else a copy downloaded into `tmp` (a store
    outage is waited out; libav reading over the network could not tell an outage from a corrupt file)."""
    if not is_remote(uri):
        return open_source(uri, storage_options)
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    local = os.path.join(tmp, "source" + os.path.splitext(path)[1])
    retry.call(lambda: fs.get_file(path, local), f"downloading {uri}")
    if os.path.getsize(local) == 0:
        raise BadVideo("empty", "zero-byte file")
    return local


def probe_source(
    src: Source, storage_options: dict[str, Any], retry: StoreRetry | None = None
) -> VideoInfo | dict[str, str]:
    """VideoInfo, or an error record {"source", "reason", "detail"}. A remote source is probed again
    through a store outage (up to the retry deadline, then StoreUnavailable), never recorded as bad for it."""

    def attempt() -> VideoInfo:
        handle = open_source(src.uri, storage_options)
        try:
            return probe(handle, src.uri, src.label, src.meta)
        finally:
            if not isinstance(handle, str):
                handle.close()

    try:
        if is_remote(src.uri):
            return (retry or StoreRetry()).call(attempt, f"probing {src.uri}")
        return attempt()
    except BadVideo as err:
        return {"source": src.uri, "reason": err.reason, "detail": err.detail}
    except (OSError, PermissionError) as err:
        return {"source": src.uri, "reason": "unreadable", "detail": f"{type(err).__name__}: {err}"}


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: deterministic bytes
    tar.addfile(info, io.BytesIO(data))


def sample_metadata(clip: Clip, spec: ClipSpec, data: bytes) -> dict[str, Any]:
    """KEY.json: where the clip comes from and what it shows. Frame i shows the source at
    start_seconds + i / fps (times from the source's first frame), upright, in the declared colour."""
    look = clip.look
    meta = {
        "key": clip.key,
        "source": clip.uri,
        "start_frame": clip.start,
        "start_seconds": round(clip.start_seconds, 6),
        "frame_step": clip.step,
        "num_frames": clip.num_frames,
        "fps": clip.out_fps,
        "source_fps": clip.src_fps,
        "source_size": [clip.src_width, clip.src_height],
        "size": [spec.size, spec.size],
        "codec": spec.codec,
        "colour": OUTPUT_COLOUR,
        "source_colour": {
            "matrix": look.matrix,
            "matrix_tagged": look.matrix_tagged,
            "range": "full" if look.full_range else "limited",
            "bit_depth": look.bit_depth,
            **({"transfer": look.transfer} if look.transfer else {}),
        },
        "rotation": look.rotation,
        "sha256": sha256_hex(data),
    }
    if clip.indices is not None:
        meta["sampled_by"] = "time"  # a variable-rate source: frames taken by presentation time
    if clip.segment is not None:
        meta["segment"] = {"start": clip.segment.start, "end": clip.segment.end, "unit": clip.segment.unit}
    if clip.label is not None:
        meta["label"] = clip.label
    if clip.split is not None:
        meta["split"] = clip.split
    return meta


@dataclass
class ShardTask:
    index: int
    clips: list[Clip]
    out: str
    spec: ClipSpec
    plan: str
    storage_options: dict[str, Any] = field(default_factory=dict)


def write_shard(task: ShardTask, on_clip: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Encode a shard's clips into a tar, upload it, then write its record. -> the record.

    on_clip(n_clips, n_bytes) is called after each clip (progress, in-process runs only).
    """
    store = Store(task.out, task.storage_options or None)  # None: the endpoint from the environment
    retry = store.retry or StoreRetry()
    ext = clip_extension(task.spec.codec)
    keys, errors, written = [], [], []
    with tempfile.TemporaryDirectory(prefix="lvmae-shard-") as tmp:
        tar_path = os.path.join(tmp, "shard.tar")
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for uri, group in groupby(task.clips, key=lambda c: c.uri):
                clips = list(group)
                try:
                    handle = fetch_source(uri, task.storage_options, tmp, retry)
                except (BadVideo, OSError) as err:
                    reason = err.reason if isinstance(err, BadVideo) else "unreadable"
                    errors += [
                        {"source": uri, "key": c.key, "reason": reason, "detail": str(err)} for c in clips
                    ]
                    continue
                try:
                    for clip, result in cut_clips(handle, clips, task.spec.size, task.spec.codec):
                        if isinstance(result, BadVideo):
                            errors.append(
                                {
                                    "source": uri,
                                    "key": clip.key,
                                    "reason": result.reason,
                                    "detail": result.detail,
                                }
                            )
                            continue
                        meta = sample_metadata(clip, task.spec, result)
                        _tar_add(tar, f"{clip.key}.{ext}", result)
                        _tar_add(tar, f"{clip.key}.json", json.dumps(meta, sort_keys=True).encode())
                        keys.append(clip.key)
                        written.append((clip.split, clip.label))
                        if on_clip is not None:
                            on_clip(1, len(result))
                finally:
                    if not isinstance(handle, str):
                        handle.close()
                    elif is_remote(uri):
                        os.unlink(handle)  # the downloaded copy
        digest = hashlib.sha256()
        with open(tar_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = os.path.getsize(tar_path)
        name = shard_name(task.index)
        store.put_file(tar_path, f"{name}.tar")
    record = {
        "shard": f"{name}.tar",
        "plan": task.plan,
        "samples": len(keys),
        "bytes": size,
        "sha256": digest.hexdigest(),
        "keys": keys,
        "counts": labels.count(written),  # {split: {label: n}}
        "errors": errors,
    }
    store.write_json(f"{name}.json", record)  # the commit marker: after the tar is in place
    return record


def run_shard_in_worker(task: ShardTask) -> dict[str, Any]:
    """write_shard(task) without progress callbacks: what a worker process of the local pool runs."""
    return write_shard(task)
