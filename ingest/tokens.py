"""`lvmae ingest tokens`: clip shards -> the frozen tokenizer's codes and priorities, in a Zarr v3 store.

Runs the tokenizer over every clip shard of a data set (in this process, or on Ray actors through
ingest.ray_executor), resumable per clip shard: shard k's rows are written whole, then its commit marker
_done/shard-NNNNNN.json; `complete: true` goes into the group attributes last. The store's format (its
arrays, their rows and chunks, the key rows, the format versions) is defined in ingest.token_store.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ingest.clip_decode import CorruptClip, decode_clip, to_model_input
from ingest.samples import Sample, tar_samples
from ingest.storage import Store
from ingest.token_store import FORMAT_VERSION, TokensError, encode_keys, open_tokens, prepare

_SHARD = re.compile(r"(?:^|/)shard-(\d+)\.tar$")


@dataclass
class TokensSummary:
    store: str  # URL of the token store
    tokenizer_id: str
    device: str
    shards: int = 0
    shards_skipped: int = 0  # already done by an earlier run
    clips: int = 0  # tokenized by this run
    skipped: int = 0  # bad samples met by this run
    seconds: float = 0.0
    complete: bool = False
    num_valid: int = 0  # tokenized samples in the whole store
    errors: list[dict[str, Any]] = field(default_factory=list, repr=False)


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise TokensError(f"unknown device {device!r}: use auto, cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise TokensError(f"device {device!r} asked for, but CUDA is not available here: use --device cpu")
    return device


def _shard_number(name: str) -> int:
    m = _SHARD.search(name)
    if m is None:
        raise TokensError(f"index.json names a shard {name!r} that is not shards/shard-NNNNNN.tar")
    return int(m.group(1))


def _check_geometry(video: Any, spec: dict[str, Any], tokenizer_dir: str, dataset: str) -> None:
    theirs = (spec.get("num_frames"), spec.get("size"))
    if (video.num_frames, video.img_size) != theirs or video.in_chans != 3:
        raise TokensError(
            f"tokenizer {tokenizer_dir} takes {video.num_frames}-frame {video.img_size}x{video.img_size} "
            f"clips with {video.in_chans} channels (video.num_frames={video.num_frames}, "
            f"video.img_size={video.img_size}), but data set {dataset} holds {theirs[0]}-frame "
            f"{theirs[1]}x{theirs[1]} RGB clips (clip_spec num_frames={theirs[0]}, size={theirs[1]}): "
            "use a tokenizer trained on this clip spec, or ingest clips with the tokenizer's"
        )


def _tar_samples(fileobj: Any) -> Iterator[Sample]:
    """(key, {extension: bytes}) per sample in tar order (ingest.samples.tar_samples). A damaged tar
    (truncated, garbled) gives the parts of its last sample read whole, then ("", {"_error": detail})."""
    return tar_samples(fileobj, report_damage=True)


def _decode_sample(key: str, parts: dict[str, bytes], ext: str, frames: int, size: int):
    """-> (T, H, W, 3) uint8 clip, or (reason, detail) when the sample is unusable."""
    if "_error" in parts:
        return "bad_shard", parts["_error"]
    data = parts.get(ext)
    if data is None:
        return "missing", f"no {key}.{ext} in the shard"
    try:
        expected = json.loads(parts["json"]).get("sha256") if "json" in parts else None
    except ValueError:
        expected = None
    if expected and expected != hashlib.sha256(data).hexdigest():
        return "checksum", f"{key}.{ext} does not match the sha256 in {key}.json"
    try:
        clip = decode_clip(data)
    except CorruptClip as err:
        return "corrupt", str(err)
    if clip.shape[0] != frames:
        return "frame_count", f"decoded to {clip.shape[0]} frames, expected {frames}"
    if clip.shape[1:3] != (size, size):
        return "frame_size", f"decoded to {clip.shape[2]}x{clip.shape[1]}, expected {size}x{size}"
    return clip


def encode_clips(model: Any, clips: np.ndarray | torch.Tensor, device: str) -> tuple[np.ndarray, np.ndarray]:
    """A frozen tokenizer on a batch of decoded clips (B, T, H, W, 3) uint8 -> (codes, priority) on the
    host, (B, T', H', W') each, priority float32. bf16 on CUDA for the encoder's convs (tensor-core speed;
    FSQ rounds in float32), the small scorer in float32 outside autocast (bf16 logits would tie); fp32 on
    the CPU."""
    video = to_model_input(clips, device)
    cuda = torch.device(device).type == "cuda"
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
        codes, priority = model.encode(video)
    return codes.cpu().numpy(), priority.float().cpu().numpy()


def _prefetch(pool: cf.Executor, items: Any, fn: Any, depth: int):
    """(item, fn(*item)) in order, keeping up to `depth` calls in flight on `pool`."""
    queue: collections.deque = collections.deque()
    for item in items:
        queue.append((item, pool.submit(fn, *item)))
        if len(queue) > depth:
            done, fut = queue.popleft()
            yield done, fut.result()
    while queue:
        done, fut = queue.popleft()
        yield done, fut.result()


@dataclass
class _Run:
    """One pass over the clip shards: what every shard shares."""

    store: Store
    group: Any  # the zarr.Group
    model: Any  # the frozen Tokenizer, on `device`
    attrs: dict[str, Any]  # the group's layout attributes
    device: str
    code_dtype: str
    bar: Any  # tqdm
    batch_size: int
    workers: int
    strict: bool

    @classmethod
    def in_worker(
        cls,
        dataset_url: str,
        storage_options: dict[str, Any] | None,
        model: Any,
        attrs: dict[str, Any],
        code_dtype: str,
        batch_size: int,
        workers: int,
        strict: bool,
        device: str,
    ) -> _Run:
        """The run of a worker process (a Ray actor): its own store and group, the model moved to
        `device`, no progress bar (the driver counts finished shards)."""
        from tqdm import tqdm

        store = Store(dataset_url, storage_options)
        group = open_tokens(store, f"tokens/{attrs['tokenizer_id']}", read_only=False)
        model, bar = model.to(device), tqdm(disable=True)
        return cls(store, group, model, attrs, device, code_dtype, bar, batch_size, workers, strict)

    def decode(self, pos: int, key: str, parts: dict[str, bytes]):
        spec = self.attrs["clip_spec"]
        return _decode_sample(key, parts, spec.get("extension", "webm"), spec["num_frames"], spec["size"])

    def shard(self, k: int, name: str) -> dict[str, Any]:
        """Tokenize clip shard `name` (number k), write its rows (one write per array), then its marker.
        A store failure part way (reading the shard, writing an array) is waited out and the shard done
        again from its start (ingest.retry): its rows are rewritten whole, its marker comes last."""
        shown = [0]  # progress shown by this shard's attempt, taken back when it starts again

        def tick(n: int) -> None:
            shown[0] += n
            self.bar.update(n)

        def attempt() -> dict[str, Any]:
            self.bar.update(-shown[0])
            shown[0] = 0
            return self._shard(k, name, tick)

        return self.store.call(attempt, f"tokenizing {self.store.uri(name)}")

    def _shard(self, k: int, name: str, tick: Callable[[int], None]) -> dict[str, Any]:
        s, grid, store = self.attrs["rows_per_shard"], self.attrs["grid"], self.store
        codes = np.full((s, *grid), -1, dtype=self.code_dtype)
        priority = np.zeros((s, *grid), dtype=np.float32)
        keys, valid = [""] * s, np.zeros(s, dtype=bool)
        errors: list[dict[str, Any]] = []
        batch: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if batch:
                rows = [pos for pos, _ in batch]
                c, p = encode_clips(self.model, np.stack([x for _, x in batch]), self.device)
                codes[rows] = c.astype(codes.dtype)
                priority[rows] = p
                valid[rows] = True
                tick(len(batch))
                batch.clear()

        with store.fs.open(store.path(name), "rb") as f, cf.ThreadPoolExecutor(self.workers) as pool:
            samples = ((pos, key, parts) for pos, (key, parts) in enumerate(_tar_samples(f)))
            for (pos, key, _), result in _prefetch(
                pool, samples, self.decode, self.batch_size + self.workers
            ):
                if not key:  # a damaged tar: the samples not read yet are lost; name them from its record
                    lost = _unread_keys(store, name, keys, pos)
                    if lost[0]:
                        keys[pos : pos + len(lost)] = lost  # same length: stays within the shard's rows
                elif pos >= s:
                    raise TokensError(f"{store.uri(name)} holds more samples than index.json says ({s})")
                elif isinstance(result, tuple):
                    keys[pos], lost = key, [key]
                else:
                    keys[pos] = key
                    batch.append((pos, result))
                    if len(batch) >= self.batch_size:
                        flush()
                    continue
                if self.strict:
                    raise TokensError(f"{name}: {lost[0] or '?'}: {result[0]}: {result[1]} (--strict)")
                errors += [
                    {"key": x or None, "shard": name, "reason": result[0], "detail": result[1]} for x in lost
                ]
                tick(len(lost))
            flush()
        rows = slice(k * s, (k + 1) * s)  # exactly one Zarr shard (or chunk) of each array
        try:
            key_rows = encode_keys(keys)
        except TokensError as err:
            raise TokensError(f"{store.uri(name)}: {err}") from None
        for array, values in (("codes", codes), ("priority", priority), ("keys", key_rows), ("valid", valid)):
            self.group[array][rows] = values
        plan, n_ok = self.attrs["source_plan"], int(valid.sum())
        record = {"shard": name, "plan": plan, "samples": n_ok, "errors": errors}
        marker = f"tokens/{self.attrs['tokenizer_id']}/_done/shard-{k:06d}.json"
        store.write_json(marker, record)  # the commit marker: after every array is written
        return record


def _unread_keys(store: Store, name: str, seen: list[str], pos: int) -> list[str]:
    """Keys of clip shard `name` after the first `pos` (from its shard record), or [""] if unknown."""
    record = name.removesuffix(".tar") + ".json"
    keys = store.read_json(record).get("keys", []) if store.exists(record) else []
    return keys[pos : len(seen)] if keys[:pos] == seen[:pos] and len(keys) > pos else [""]


def ingest_tokens(
    dataset_url: str,
    tokenizer_dir: str,
    batch_size: int = 8,
    device: str = "auto",
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    workers: int = 1,
    strict: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
) -> TokensSummary:
    """Tokenize (or finish tokenizing) every clip of a data set; see the module docstring.

    workers: threads decoding clips ahead of the tokenizer. strict: fail on the first bad sample.
    executor: "local" (this process) or "ray" (Ray actors holding the tokenizer, a clip shard at a time,
    on the cluster at ray_address or on a local Ray when it is None; ingest.ray_executor).
    """
    from tqdm import tqdm

    from lvmae.tokenizer import load_tokenizer, tokenizer_id

    if batch_size < 1 or workers < 1:
        raise TokensError("batch size and workers must be >= 1")
    started = time.perf_counter()
    store = Store(dataset_url, storage_options)
    if not store.exists("index.json"):
        raise TokensError(
            f"{store.url} is not a complete data set (no index.json): run lvmae ingest clips first"
        )
    index = store.read_json("index.json")
    shards = sorted((_shard_number(s["name"]), s["name"], s["samples"]) for s in index["shards"])
    if not shards or max(s[2] for s in shards) == 0:
        raise TokensError(f"{store.url} holds no samples")
    on_ray = executor == "ray"
    dev = "cpu" if on_ray else _device(device)  # on Ray the actors pick theirs; this copy is shipped
    try:
        model = load_tokenizer(tokenizer_dir, device=dev)
    except ValueError as err:
        raise TokensError(str(err)) from None
    cfg = model.cfg
    _check_geometry(cfg.video, index["clip_spec"], tokenizer_dir, store.url)
    model.eval().requires_grad_(False)
    tid = tokenizer_id(model)
    s = max(n for _, _, n in shards)
    attrs = {
        "format_version": FORMAT_VERSION,
        "tokenizer_id": tid,
        "quantizer": cfg.quantizer,
        "fsq_levels": list(cfg.fsq_levels) if cfg.quantizer == "fsq" else None,
        "codebook_size": cfg.codebook_size,
        "grid": list(cfg.video.grid),
        "tubelet": [cfg.video.tubelet_size, cfg.video.patch_size, cfg.video.patch_size],
        "rows_per_shard": s,
        "num_rows": (shards[-1][0] + 1) * s,
        "num_clip_shards": len(shards),
        "source_plan": index["plan"],
        "clip_spec": index["clip_spec"],
    }
    code_dtype = "int16" if cfg.codebook_size <= 1 << 15 else "int32"
    base = f"tokens/{tid}"
    group = open_tokens(store, base, read_only=False)
    prepare(group, attrs, code_dtype, store.uri(base))

    summary = TokensSummary(store=store.uri(base), tokenizer_id=tid, device=dev, shards=len(shards))
    done = set(store.list(f"{base}/_done"))
    todo = [(k, name, n) for k, name, n in shards if f"shard-{k:06d}.json" not in done]
    summary.shards_skipped = len(shards) - len(todo)
    if todo and group.attrs.get("complete"):
        group.attrs["complete"] = False  # being changed: not complete until every shard is done again
    bar = tqdm(total=sum(n for _, _, n in todo), desc="tokens", unit="clip", disable=not progress)

    def account(record: dict[str, Any]) -> None:
        summary.clips += record["samples"]
        summary.skipped += len(record["errors"])
        summary.errors += record["errors"]

    try:
        if on_ray and todo:
            settings = (code_dtype, batch_size, workers, strict)
            make = functools.partial(_Run.in_worker, dataset_url, storage_options, model, attrs, *settings)
            summary.device = _run_on_ray(make, todo, device, ray_address, account, bar)
        else:
            run = _Run(store, group, model, attrs, dev, code_dtype, bar, batch_size, workers, strict)
            for k, name, _ in todo:
                account(run.shard(k, name))
    finally:
        bar.close()

    if todo or not group.attrs.get("complete"):
        records = [store.read_json(f"{base}/_done/shard-{k:06d}.json") for k, _, _ in shards]
        errors = [e for r in records for e in r["errors"]]
        store.write_bytes(
            f"{base}/errors.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode()
        )
        num_valid = sum(r["samples"] for r in records)
        group.attrs.update({"complete": True, "num_samples": num_valid, "num_errors": len(errors)})
    summary.complete = True
    summary.num_valid = int(group.attrs["num_samples"])
    summary.seconds = round(time.perf_counter() - started, 2)
    return summary


def _run_on_ray(
    make_runner: Callable[[str], _Run],
    todo: list[tuple[int, str, int]],
    device: str,
    address: str | None,
    account: Callable[[dict[str, Any]], None],
    bar: Any,
) -> str:
    """Tokenize the `todo` shards on Ray actors; account(record) and advance the bar as each completes.
    -> what ran them (device, actors), for the summary."""
    from ingest.ray_executor import ray_session, tokenize_shards

    with ray_session(address) as ray:
        shards = [(k, name) for k, name, _ in todo]
        ran_on, records = tokenize_shards(ray, make_runner, shards, device, torch.get_num_threads())
        for record in records:
            account(record)
            bar.update(record["samples"] + len(record["errors"]))
    return ran_on
