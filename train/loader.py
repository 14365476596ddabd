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

On another world size (reshard: the states of every old rank): the rest of the epoch is read as lanes of
the old ranks' streams (train.lanes), cut into this run's ranks' shares of each step; the next epoch is
sharded over this world size. `step_batches` (gradient accumulation) sets each stream's block per step.
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
from train import lanes as ln
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


def saved_lanes(state: dict[str, Any]) -> list[ln.Lane]:
    """The lanes of a saved loader state, each past what its rank took of it."""
    return [ln.from_dict(d).advance(t) for d, t in zip(state["lanes"], state["taken"], strict=True)]


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
        self.step_batches = 1  # batches a training step takes (gradient accumulation): lanes' period
        # An epoch re-sharded after a change of world size (reshard): this rank's lanes of the streams of
        # a layout of `lane_layout` ranks, what it took of each, and the epoch's batches per rank.
        self.lanes: list[ln.Lane] | None = None
        self.lane_taken: list[int] = []
        self.lane_layout, self.lane_limit = 0, 0
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
        state = {name: getattr(self, name) for name in names} | {"split": self.split}
        state["step_batches"] = self.step_batches
        if self.lanes is not None:
            state |= {"lanes": [ln.to_dict(lane) for lane in self.lanes], "taken": list(self.lane_taken)}
            state |= {"layout": self.lane_layout, "limit": self.lane_limit}
        return state

    def _check_order(self, state: dict[str, Any], names: tuple[str, ...]) -> None:
        for name in names:
            if state.get(name, getattr(self, name)) != getattr(self, name):
                raise LoaderError(
                    f"loader state was saved with {name}={state[name]}, this loader has {getattr(self, name)}: "
                    "resuming would not give the same samples"
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` at the next batch. The order-defining settings must match (another world
        size: reshard)."""
        self._check_order(state, ("seed", "rank", "world_size", "shuffle_buffer", "split"))
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.batches = int(state.get("batches", 0))
        self.lanes = None
        if "lanes" in state:  # in an epoch re-sharded earlier: its lanes, past what they gave
            self._set_lanes(saved_lanes(state), state["layout"], state["limit"])

    def _set_lanes(self, lanes: list[ln.Lane], layout: int, limit: int) -> None:
        self.lanes, self.lane_taken = lanes, [0] * len(lanes)
        self.lane_layout, self.lane_limit = layout, limit

    def reshard(self, states: list[dict[str, Any]]) -> dict[str, int]:
        """Continue from the states of every rank of a run of another world size (train.lanes): the rest of
        their epoch is cut into this run's ranks' shares of each step, so that no sample of it is repeated
        or skipped and each step's global batch holds the samples it would have held; later epochs are
        sharded over this world size. -> {"epoch", "samples_left": of the epoch, over all ranks,
        "batches": per rank, in the rest of the epoch}."""
        states = sorted(states, key=lambda st: st["rank"])
        for st in states:
            self._check_order(st, ("seed", "shuffle_buffer", "split"))
        epochs = {int(st["epoch"]) for st in states}
        if len(epochs) != 1 or [st["rank"] for st in states] != list(range(states[0]["world_size"])):
            raise LoaderError("the saved loader states are not those of every rank of one run at one epoch")
        epoch = epochs.pop()
        old: list[ln.Lane] = []
        layout = int(states[0].get("layout", states[0]["world_size"]))
        for st in states:
            if "lanes" in st:
                old += saved_lanes(st)
                continue
            world, batch, accum = int(st["world_size"]), int(st["batch_size"]), int(st.get("step_batches", 1))
            # what the old run would still have drawn (a rank on its own: its whole stream, full batches)
            end = max(0, self.even_limit(epoch, world, batch, accum) - int(st["batches"])) * batch
            old.append(ln.Lane(st["rank"], int(st["consumed"]), batch * accum, 0, batch * accum, 0, end))
        try:
            shares = ln.split(old, self.world_size)
        except ValueError as err:
            raise LoaderError(f"cannot re-shard the epoch in flight: {err}") from None
        per_rank = [sum(lane.picks() or 0 for lane in share) // self.batch_size for share in shares]
        limit = min(per_rank) if self.even_batches else per_rank[self.rank]
        limit = limit // self.step_batches * self.step_batches  # whole steps
        self.epoch, self.consumed, self.batches = epoch, 0, 0
        if limit > 0:
            self._set_lanes(shares[self.rank], layout, limit)
        else:  # nothing left of the epoch: the next one, sharded over this world size
            self.epoch, self.lanes = epoch + 1, None
        return {"epoch": epoch, "samples_left": sum(lane.picks() or 0 for lane in old), "batches": limit}

    def stream_samples(self, epoch: int, rank: int, world_size: int) -> int:
        """Samples (of the split) in stream `rank` of a layout of `world_size` ranks, by index.json."""
        names = split_by_rank(shard_order(self.shards, self.seed, epoch), rank, world_size)
        return sum(self.shard_samples[n] for n in names)

    def batches_per_epoch(self, epoch: int) -> int | None:
        """The batches every rank yields in `epoch`: with even_batches or accumulating steps, even_limit at
        this loader's layout; else None (as many as there are)."""
        if not self.even_batches and self.step_batches == 1:
            return None
        return self.even_limit(epoch, self.world_size, self.batch_size, self.step_batches)

    def even_limit(self, epoch: int, world_size: int, batch_size: int, step_batches: int) -> int:
        """The batches of `batch_size` the fewest-filled stream of a layout of `world_size` ranks gives in
        `epoch`, rounded down to whole steps of `step_batches` so that no step spans two epochs."""
        fewest = min(self.stream_samples(epoch, r, world_size) for r in range(world_size)) // batch_size
        return fewest // step_batches * step_batches

    def samples(self, epoch: int, rank: int | None = None, world_size: int | None = None) -> Iterator[Sample]:
        """This rank's samples of `epoch` (or stream `rank` of a layout of `world_size` ranks), shuffled, as
        raw bytes: what replay skips through."""
        rank = self.rank if rank is None else rank
        world = self.world_size if world_size is None else world_size
        names = split_by_rank(shard_order(self.shards, self.seed, epoch), rank, world)

        def open_shard(name: str) -> IO[bytes]:
            return self.store.fs.open(self.store.path(name), "rb")

        gen = np.random.default_rng([self.seed, epoch, rank])
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
            drawn = [self.consumed]
            if self.lanes is None:
                limit = self.batches_per_epoch(self.epoch)
                # replay: the first `consumed` samples are read and dropped as bytes, never decoded
                readers = [
                    prefetch(
                        itertools.islice(self.samples(self.epoch), self.consumed, None),
                        self.prefetch,
                        self.stats,
                    )
                ]
                source, check = counted(readers[0], drawn), keep
            else:  # an epoch re-sharded after a change of world size: this rank's lanes, in turn
                limit = self.lane_limit

                def kept(sample: Sample) -> bool:
                    return ext in sample[1] and keep(*sample)

                streams = [self.samples(self.epoch, lane.stream, self.lane_layout) for lane in self.lanes]
                readers = [
                    prefetch(ln.lane_samples(st, lane, kept), self.prefetch, self.stats)
                    for st, lane in zip(streams, self.lanes, strict=True)
                ]
                widths = [lane.width for lane in self.lanes]
                source, check = ln.interleave(readers, widths, self.lane_taken), lambda key, parts: True
            batches = decode_batches(
                source, self._decode, self.batch_size, ext, self.drop_last, self.stats, check
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
            finally:  # the caller may stop early: end the read-ahead threads now, not at garbage collection
                batches.close()
                for reader in readers:
                    reader.close()
            self.epoch, self.consumed, self.batches, self.lanes = self.epoch + 1, 0, 0, None
