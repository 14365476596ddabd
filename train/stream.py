"""The training loader's stream stages (webdataset style), each a small generator usable on a plain list:

    shard_order (seeded by seed + epoch, same on every rank) -> split_by_rank (round robin)
    -> read_shards (fsspec stream, outages waited out, damaged tars re-read) -> shuffle (seeded buffer)
    -> prefetch (a read-ahead thread) -> counted (how far the stream was drawn, for resume)
    -> decode_batches (bad clips skipped, batches refilled)

train.loader.ClipLoader chains them; the trainer reads decoded batches ahead with `prefetch` too.
"""

from __future__ import annotations

import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import numpy as np
import torch

from ingest.retry import RetryPolicy, StoreRetry, is_transient, store_errors
from ingest.samples import tar_samples  # (KEY, {extension: bytes}) per sample of a tar stream

Sample = tuple[str, dict[str, bytes]]  # (KEY, {extension: bytes})


STORE_ERRORS = store_errors()  # OSError, and botocore's errors where botocore is installed


class LoaderError(Exception):
    """The loader cannot start or go on (no data set, too few shards, an unreachable store): a user error."""


def shard_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: a permutation seeded by seed + epoch, the same on every rank."""
    gen = torch.Generator().manual_seed(seed + epoch)
    return [shards[i] for i in torch.randperm(len(shards), generator=gen).tolist()]


def split_by_rank(items: list[str], rank: int, world_size: int) -> list[str]:
    """Round robin over the (shuffled) list: ranks get disjoint shards that cover it."""
    if len(items) < world_size:
        raise LoaderError(
            f"cannot split {len(items)} shards over {world_size} ranks: every rank needs at least one shard; "
            "ingest with smaller shards (shard_clips / shard_bytes) or train on fewer ranks"
        )
    return items[rank::world_size]


def read_shards(
    names: Iterable[str],
    open_shard: Callable[[str], IO[bytes]],
    retries: int,
    stats: dict[str, float],
    retry: StoreRetry | None = None,
) -> Iterator[Sample]:
    """The samples of each shard in turn, streamed. A read that fails re-opens the shard and skips the
    samples already given, so nothing is lost or given twice:
    - a store failure (connection, timeout, 5xx; ingest.retry.is_transient) is waited out by `retry`
      (backoff up to its deadline, restarted whenever the read gets further; StoreUnavailable past it);
    - a damaged tar (which a cut-off stream can look like) is re-read up to `retries` times; still damaged,
      it ends its shard (stats["bad_shards"]) and the next shard follows.
    Re-opens are counted in stats["retries"]. Without `retry`, a store failure is re-tried `retries` times
    like a damaged tar, then raised as LoaderError."""
    retry = retry or StoreRetry(RetryPolicy(deadline_s=0))
    for name in names:
        given, damaged = 0, 0
        with retry.operation(f"reading shard {name}") as op:
            while True:
                try:
                    with open_shard(name) as f:
                        for i, (key, parts) in enumerate(tar_samples(f)):
                            if i < given:
                                continue
                            stats["bytes_read"] += sum(len(v) for v in parts.values())
                            given += 1
                            op.progress()
                            yield key, parts
                    break
                except (tarfile.TarError, EOFError):
                    if damaged >= retries:
                        stats["bad_shards"] += 1
                        break
                    damaged += 1
                    time.sleep(min(0.1 * 2**damaged, 2.0))
                except Exception as err:
                    if not is_transient(err):
                        if isinstance(err, STORE_ERRORS):
                            raise LoaderError(f"cannot read shard {name}: {err}") from err
                        raise
                    if retry.policy.deadline_s > 0:
                        op.failed(err)  # waits, or raises StoreUnavailable past the deadline
                    elif damaged >= retries:
                        raise LoaderError(f"reading shard {name} failed {damaged + 1} times: {err}") from err
                    else:
                        damaged += 1
                        time.sleep(min(0.1 * 2**damaged, 2.0))
                stats["retries"] += 1


def shuffle(samples: Iterable[Any], buffer_size: int, gen: np.random.Generator) -> Iterator[Any]:
    """A seeded shuffle buffer: fill `buffer_size` items, then give a random one for each new one."""
    if buffer_size <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for item in samples:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = int(gen.integers(len(buf)))
        yield buf[i]
        buf[i] = item
    for i in gen.permutation(len(buf)).tolist():
        yield buf[i]


_END = object()  # the read-ahead thread's last item, after the stream (or beside the error that ended it)
READER_THREAD = "lvmae-loader-prefetch"
# Decoded batches the trainer reads ahead of its step (the prefetch queue); its reader thread can hold
# one more, so up to READ_AHEAD_BATCHES + 1 batches wait beside the one a step uses (train.memory counts them).
READ_AHEAD_BATCHES = 2


def join_readers(timeout: float) -> bool:
    """Wait up to `timeout` s for this process's read-ahead threads to end (after their consumers closed
    them, and a stopping run cancelled its retries); -> whether all have. A process that exits with reads
    still in flight gets asyncio's and zarr's complaints about them printed at interpreter shutdown."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name == READER_THREAD:
            thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.name == READER_THREAD and t.is_alive() for t in threading.enumerate())


def prefetch(items: Iterable[Any], depth: int, stats: dict[str, float] | None = None) -> Iterator[Any]:
    """The same items in the same order, read ahead by a thread (up to `depth` waiting): shard bytes stream
    in while the caller decodes. An error in the reader is raised here, at the item where it happened.
    stats["queue_depth"], if given, is how many items were waiting when the caller took the last one."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put((_END, None))
        except BaseException as err:  # handed to the consumer, which re-raises it with its traceback
            put((_END, err))

    thread = threading.Thread(target=work, name=READER_THREAD, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if stats is not None:
                stats["queue_depth"] = q.qsize()
            if isinstance(item, tuple) and len(item) == 2 and item[0] is _END:
                if item[1] is not None:
                    raise item[1]
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def counted(items: Iterable[Any], counter: list[int]) -> Iterator[Any]:
    """Pass items through, counting them in counter[0] (how far the stream has been drawn)."""
    for item in items:
        counter[0] += 1
        yield item


def decode_batches(
    samples: Iterable[Sample],
    decode: Callable[[list[bytes]], tuple[torch.Tensor, list[int]]],
    batch_size: int,
    ext: str,
    drop_last: bool,
    stats: dict[str, float],
    keep: Callable[[str, dict[str, bytes]], bool] = lambda key, parts: True,
) -> Iterator[tuple[torch.Tensor, list[str], list[dict[str, bytes]]]]:
    """(clips (B, ...), keys, parts without the clip): samples that `keep` rejects, that lack the clip, or
    that the decoder reports bad are skipped (stats["skipped"]) and the batch is refilled from the stream,
    so batches stay full. `keep` rejections that are not errors (another split) are not counted."""
    it = iter(samples)
    done: list[torch.Tensor] = []
    keys: list[str] = []
    others: list[dict[str, bytes]] = []
    while True:
        want, pending, started = batch_size - len(keys), [], time.perf_counter()
        for key, parts in it:
            if ext not in parts:
                stats["skipped"] += 1
                continue
            if not keep(key, parts):
                continue
            pending.append((key, parts))
            if len(pending) == want:
                break
        stats["wait_seconds"] += time.perf_counter() - started
        if len(pending) < want and drop_last:  # the stream has ended and cannot fill this batch
            return
        if pending:
            started = time.perf_counter()
            clips, bad = decode([parts[ext] for _, parts in pending])
            stats["decode_seconds"] += time.perf_counter() - started
            stats["skipped"] += len(bad)
            done.append(clips)
            bad_set = set(bad)
            for i, (k, parts) in enumerate(pending):
                if i not in bad_set:
                    keys.append(k)
                    others.append({e: v for e, v in parts.items() if e != ext})
        if len(keys) == batch_size or (len(pending) < want and keys and not drop_last):
            yield torch.cat(done) if len(done) > 1 else done[0], keys, others
            done, keys, others = [], [], []
        if len(pending) < want:  # the stream has ended
            return
