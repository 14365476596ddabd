"""The training loader: clip shards (local or s3://) -> batches of decoded clips, with exact mid-epoch resume.

A chain of small generator stages (webdataset style), each usable on a plain list:

    shard_order (seeded by seed + epoch, same on every rank; with a split, only shards holding it)
    -> split_by_rank (round robin) -> read_shards (fsspec stream, outages waited out) -> tar_samples
    (KEY.webm + KEY.json grouped) -> shuffle (seeded buffer) -> [skip `consumed` on resume]
    -> decode_batches (other splits' samples passed over, bad clips skipped, batch refilled)
    -> token join (codes, priority; invalid rows skipped before decoding), class ids from KEY.json

One process per rank: decoding is parallel inside DALI (its threads), not across DataLoader workers.

Resume (mosaicml/streaming's contract, by replay): the state is (epoch, consumed, batches), where consumed
counts the samples this rank has drawn from its shuffled stream up to the last batch it handed out (bad and
token-less samples included). Shard order and shuffle buffer are pure functions of (seed, epoch, rank), and
skipping is deterministic, so load_state_dict rebuilds them and skips `consumed` samples at the bytes level
(read, never decoded), then yields exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import itertools
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import numpy as np
import torch

from ingest.labels import LabelError, LabelSpec, SampleFilter
from ingest.retry import RetryPolicy, StoreRetry, is_transient, store_errors
from ingest.samples import tar_samples  # (KEY, {extension: bytes}) per sample of a tar stream
from ingest.storage import Store

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
# one more, so up to READ_AHEAD_BATCHES + 1 batches wait beside the one a step uses (train.plan counts them).
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


class TokenJoin:
    """Codes and priority of samples by KEY from a token store `tokens/<id>/`: the group, its array handles
    and the key -> row map are read once (one metadata read per run); each batch reads only its rows.
    Reads go through the store's retry (a remote store's outage is waited out, see ingest.retry)."""

    def __init__(self, store: Store, tokenizer_id: str):
        from ingest.tokens import TokensError, check_format, decode_keys, open_tokens

        rel = f"tokens/{tokenizer_id}"
        self.url, self.store = store.uri(rel), store
        url = self.url
        try:
            self.group = store.call(lambda: open_tokens(store, rel), f"opening token store {url}")
        except FileNotFoundError as err:
            raise LoaderError(f"no token store {url}") from err
        try:
            check_format(dict(self.group.attrs), url)
        except TokensError as err:
            raise LoaderError(str(err)) from None
        if not self.group.attrs.get("complete"):
            raise LoaderError(f"token store {url} is incomplete: finish ingest")
        self.codes, self.priority, keys_array, valid_array = store.call(
            lambda: [self.group[name] for name in ("codes", "priority", "keys", "valid")],
            f"opening the arrays of {url}",
        )
        keys = decode_keys(store.call(lambda: keys_array[:], f"reading {url}/keys"))
        valid = store.call(lambda: valid_array[:], f"reading {url}/valid")
        self.rows = {str(k): i for i, (k, v) in enumerate(zip(keys, valid)) if v and k}

    def has(self, key: str) -> bool:
        return key in self.rows

    def _read(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        codes, priority = self.codes.oindex[rows], self.priority.oindex[rows]
        if (codes < 0).any():  # a valid row holds no fill value: the store answered "missing" for a part
            raise OSError(f"token rows {rows} of {self.url} came back partly empty")
        return codes, priority

    def __call__(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> codes (B, T', H', W') int64, priority (B, T', H', W') float32, in the order of `keys`."""
        rows = [self.rows[k] for k in keys]
        codes, priority = self.store.call(lambda: self._read(rows), f"reading token rows of {self.url}")
        return torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(priority.astype(np.float32))


class ClipLoader:
    """Batches {"video" (B, 3, T, H, W) float, "keys", "codes"?, "priority"?, "labels"?, "epoch", "state"} from a clip
    data set. "state" is state_dict() as of right after this batch: a consumer that reads batches ahead (in
    a thread) checkpoints the state of the last batch it used, not the loader's own, which runs ahead.

    seed: shard order uses seed + epoch (all ranks alike); the shuffle buffer uses (seed, epoch, rank).
    tokens: a tokenizer id: join codes and priority from `tokens/<id>/`; rows not valid there are skipped.
    split: only the samples of this split (train / val / test; ingest.labels); None: every sample.
    labels: add "labels" (B,) int64 class ids (index.json's class map); every sample must have a label.
    decoder: "auto" (DALI where installed), "dali" or "pyav"; decoder_kwargs go to make_clip_decoder.
    retries: re-reads of a damaged shard before it is passed over. retry_deadline: seconds one store read
    may keep failing (connection, timeout, 5xx) before StoreUnavailable; waited out with backoff until then.
    epochs: stop after this epoch number (exclusive); None iterates forever.
    prefetch: samples read ahead by a thread while the caller decodes (0: none); default 2 x batch_size.
    even_batches: every rank yields the same number of (full) batches per epoch, min over ranks of
    (its samples in index.json // batch_size), so that collectives do not hang at an epoch's end; on by
    default when world_size > 1. Samples skipped as bad can still leave a rank short of that number.
    """

    def __init__(
        self,
        dataset_url: str,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 64,
        tokens: str | None = None,
        decoder: str = "auto",
        storage_options: dict[str, Any] | None = None,
        retries: int = 3,
        retry_deadline: float = 300.0,
        drop_last: bool = True,
        epochs: int | None = None,
        prefetch: int | None = None,
        even_batches: bool | None = None,
        decoder_kwargs: dict[str, Any] | None = None,
        split: str | None = None,
        labels: bool = False,
    ):
        if batch_size < 1 or not 0 <= rank < world_size or retries < 0 or retry_deadline < 0:
            raise LoaderError(
                f"bad loader settings: batch_size={batch_size}, rank={rank} of world_size={world_size}, "
                f"retries={retries}, retry_deadline={retry_deadline}"
            )
        # one retry state for every read of this loader (shards, index, tokens): its counters feed metrics
        self.retry = StoreRetry(RetryPolicy(deadline_s=retry_deadline))
        self.store = Store(dataset_url, storage_options, retry=self.retry)
        try:
            index = self.store.read_json("index.json")
        except FileNotFoundError:
            raise LoaderError(f"{self.store.url} is not a complete data set (no index.json)") from None
        except STORE_ERRORS as err:
            raise LoaderError(f"cannot read {self.store.uri('index.json')}: {err}") from err
        try:
            self.filter = SampleFilter(index, LabelSpec(split, labels), self.store.url)
        except LabelError as err:
            raise LoaderError(str(err)) from None
        self.split, self.labels = split, labels
        if split is None:
            counts = {s["name"]: int(s["samples"]) for s in index["shards"]}
        else:  # only the shards that hold samples of the split are read
            counts = {s["name"]: int(s.get("splits", {}).get(split, 0)) for s in index["shards"]}
        self.shard_samples = {name: n for name, n in counts.items() if n > 0}
        self.classes = self.filter.classes
        self.label_counts: dict[str, dict[str, int]] = (index.get("labels") or {}).get("counts", {})
        self.shards = list(self.shard_samples)
        split_by_rank(self.shards, rank, world_size)  # fail now, not at the first batch
        self.spec = index["clip_spec"]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle_buffer, self.retries, self.drop_last = shuffle_buffer, retries, drop_last
        self.epochs = epochs
        self.prefetch = 2 * batch_size if prefetch is None else prefetch
        self.even_batches = world_size > 1 if even_batches is None else even_batches
        self.tokens = TokenJoin(self.store, tokens) if tokens else None
        self.decoder_name, self.decoder_kwargs = decoder, decoder_kwargs or {}
        self._decoder: Any = None
        self.epoch, self.consumed, self.batches = 0, 0, 0  # batches: yielded in this epoch
        self.stats: dict[str, float] = dict.fromkeys(
            (
                "samples",
                "frames",
                "skipped",
                "retries",
                "bad_shards",
                "bytes_read",
                "decode_seconds",
                "wait_seconds",
                "queue_depth",
            ),
            0,
        )

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands: after the last batch it yielded. JSON-able."""
        names = ("epoch", "consumed", "batches", "seed", "rank", "world_size", "shuffle_buffer", "batch_size")
        return {name: getattr(self, name) for name in names} | {"split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` at the next batch. The order-defining settings must match."""
        for name in ("seed", "rank", "world_size", "shuffle_buffer", "split"):
            if state.get(name, getattr(self, name)) != getattr(self, name):
                raise LoaderError(
                    f"loader state was saved with {name}={state[name]}, this loader has {getattr(self, name)}: "
                    "resuming would not give the same samples"
                )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.batches = int(state.get("batches", 0))

    def batches_per_epoch(self, epoch: int) -> int | None:
        """With even_batches, the batches every rank yields in `epoch`; else None (as many as there are)."""
        if not self.even_batches:
            return None
        order = shard_order(self.shards, self.seed, epoch)
        per_rank = [
            sum(self.shard_samples[n] for n in split_by_rank(order, r, self.world_size))
            for r in range(self.world_size)
        ]
        return min(per_rank) // self.batch_size

    def samples(self, epoch: int) -> Iterator[Sample]:
        """This rank's samples of `epoch`, shuffled, as raw bytes: what replay skips through."""
        names = split_by_rank(shard_order(self.shards, self.seed, epoch), self.rank, self.world_size)

        def open_shard(name: str) -> IO[bytes]:
            return self.store.fs.open(self.store.path(name), "rb")

        gen = np.random.default_rng([self.seed, epoch, self.rank])
        shards = read_shards(names, open_shard, self.retries, self.stats, self.retry)
        return shuffle(shards, self.shuffle_buffer, gen)

    def _decode(self, batch: list[bytes]) -> tuple[torch.Tensor, list[int]]:
        if self._decoder is None:
            from train.decode import make_clip_decoder

            spec, kwargs = self.spec, self.decoder_kwargs
            self._decoder = make_clip_decoder(
                self.decoder_name, spec["num_frames"], spec["size"], self.batch_size, **kwargs
            )
        return self._decoder.decode(batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        def keep(key: str, parts: dict[str, bytes]) -> bool:
            if self.split is not None and not self.filter.keep(SampleFilter.meta(parts)):
                return False  # another split's sample: not an error
            if self.tokens is not None and not self.tokens.has(key):
                self.stats["skipped"] += 1  # no valid token row
                return False
            return True

        ext = self.spec.get("extension", "webm")
        while self.epochs is None or self.epoch < self.epochs:
            limit = self.batches_per_epoch(self.epoch)
            drawn = [self.consumed]
            # replay: the first `consumed` samples are read and dropped as bytes, never decoded
            stream = prefetch(
                itertools.islice(self.samples(self.epoch), self.consumed, None), self.prefetch, self.stats
            )
            batches = decode_batches(
                counted(stream, drawn), self._decode, self.batch_size, ext, self.drop_last, self.stats, keep
            )
            try:
                while limit is None or self.batches < limit:
                    video, keys, others = next(batches, (None, [], []))
                    if video is None:
                        break
                    batch: dict[str, Any] = {"video": video, "keys": keys, "epoch": self.epoch}
                    if self.labels:
                        ids = [self.filter.label_id(SampleFilter.meta(o)) for o in others]
                        batch["labels"] = torch.tensor(ids, dtype=torch.int64)
                    if self.tokens is not None:
                        batch["codes"], batch["priority"] = self.tokens(keys)
                    self.consumed, self.batches = drawn[0], self.batches + 1
                    self.stats["samples"] += len(keys)
                    self.stats["frames"] += len(keys) * self.spec["num_frames"]
                    batch["state"] = self.state_dict()
                    yield batch
            finally:  # the caller may stop early: end the read-ahead thread now, not at garbage collection
                batches.close()
                stream.close()
            self.epoch, self.consumed, self.batches = self.epoch + 1, 0, 0
