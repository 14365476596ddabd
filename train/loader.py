"""The training loader: clip shards (local or s3://) -> batches of decoded clips, with exact mid-epoch resume.

A chain of small generator stages (train.stream, webdataset style), each usable on a plain list:

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
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import torch

from ingest.labels import LabelError, LabelSpec, SampleFilter
from ingest.retry import RetryPolicy, StoreRetry
from ingest.storage import Store
from train.stream import (
    STORE_ERRORS,
    LoaderError,
    Sample,
    counted,
    decode_batches,
    prefetch,
    read_shards,
    shard_order,
    shuffle,
    split_by_rank,
)


class TokenJoin:
    """Codes and priority of samples by KEY from a token store `tokens/<id>/`: the group, its array handles
    and the key -> row map are read once (one metadata read per run); each batch reads only its rows.
    Reads go through the store's retry (a remote store's outage is waited out, see ingest.retry)."""

    def __init__(self, store: Store, tokenizer_id: str):
        from ingest.token_store import TokensError, check_format, decode_keys, open_tokens

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
            from train.decoders import make_clip_decoder

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
