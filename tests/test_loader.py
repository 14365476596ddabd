"""train.loader: the stages on plain lists, then the whole loader on real VP9 clips (local and S3): every
sample once per epoch and rank, seeded orders, exact resume, token join, bad clips skipped."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_ingest_tokens import tok_cfg

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.samples import tar_samples
from ingest.storage import Store
from ingest.token_store import decode_keys
from ingest.tokens import ingest_tokens
from lvmae.tokenizer import Tokenizer, save_tokenizer
from train.loader import ClipLoader
from train.stream import LoaderError, prefetch, read_shards, shard_order, shuffle, split_by_rank

FRAMES, SIZE, PER_SHARD, N = 8, 32, 4, 30  # two 120-frame videos -> 30 clips in 8 shards
GRID = (4, 4, 4)


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def new_stats() -> dict[str, float]:
    return dict.fromkeys(("retries", "bad_shards", "bytes_read"), 0)


# ---- stages on plain lists -------------------------------------------------------------------------


def test_shard_order_and_rank_split():
    shards = [f"s{i}" for i in range(10)]
    assert shard_order(shards, 0, 0) == shard_order(shards, 0, 0)
    assert sorted(shard_order(shards, 0, 3)) == shards
    assert shard_order(shards, 0, 0) != shard_order(shards, 0, 1)
    parts = [split_by_rank(shards, r, 3) for r in range(3)]
    assert sorted(k for p in parts for k in p) == shards and [len(p) for p in parts] == [4, 3, 3]
    with pytest.raises(LoaderError, match="cannot split 2 shards over 3 ranks"):
        split_by_rank(shards[:2], 0, 3)


def test_shuffle_is_a_seeded_permutation():
    items = list(range(100))
    a = list(shuffle(items, 16, np.random.default_rng(1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffle(items, 16, np.random.default_rng(1)))
    assert a != list(shuffle(items, 16, np.random.default_rng(2)))
    assert list(shuffle(items, 1, np.random.default_rng(1))) == items


def test_tar_samples_groups_members_by_key():
    samples = [("a", {"webm": b"1", "json": b"{}"}), ("b", {"webm": b"22", "json": b"[]"})]
    assert list(tar_samples(io.BytesIO(tar_bytes(samples)))) == samples


class Flaky(io.BytesIO):
    """A stream that raises OSError after `fail_at` bytes (a dropped connection)."""

    def __init__(self, data: bytes, fail_at: int | None):
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, n: int | None = -1) -> bytes:
        if self.fail_at is not None and self.tell() + (n if n and n > 0 else 1 << 30) > self.fail_at:
            raise OSError("connection reset")
        return super().read(n)


def test_read_shards_reopens_and_retries():
    samples = [(f"k{i}", {"webm": bytes([i]) * 2000, "json": b"{}"}) for i in range(5)]
    data = tar_bytes(samples)
    opened: list[str] = []

    def open_once_flaky(name: str):
        opened.append(name)
        return Flaky(data, 6000 if len(opened) == 1 else None)  # the first open dies mid-shard

    stats = new_stats()
    got = list(read_shards(["x"], open_once_flaky, retries=2, stats=stats))
    assert got == samples and stats["retries"] == 1 and opened == ["x", "x"]

    with pytest.raises(LoaderError, match="reading shard x failed 3 times"):
        list(read_shards(["x"], lambda name: Flaky(data, 100), retries=2, stats=new_stats()))


def test_damaged_tar_ends_its_shard_only():
    good = tar_bytes([("a", {"webm": b"1"})])
    stats = new_stats()
    opener = {"bad": lambda: io.BytesIO(b"not a tar" * 100), "good": lambda: io.BytesIO(good)}
    got = list(read_shards(["bad", "good"], lambda n: opener[n](), retries=0, stats=stats))
    assert got == [("a", {"webm": b"1"})] and stats["bad_shards"] == 1


def test_prefetch_keeps_order_raises_errors_and_stops_early():
    assert list(prefetch(range(50), 4)) == list(range(50)) == list(prefetch(range(50), 0))

    def failing():
        yield from range(3)
        raise OSError("store gone")

    got: list[int] = []
    with pytest.raises(OSError, match="store gone"):
        got.extend(prefetch(failing(), 2))
    assert got == [0, 1, 2]

    before = threading.active_count()
    it = prefetch(iter(range(10**6)), 2)
    assert next(it) == 0
    it.close()
    assert threading.active_count() == before


# ---- the loader on real clips -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(sample_videos, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("carphone_pristine", "carphone_distorted"):
        os.symlink(sample_videos[name], src / f"{name}.mp4")
    out = tmp_path_factory.mktemp("ds") / "ds"
    cfg = IngestConfig(clip=ClipSpec(num_frames=FRAMES, size=SIZE), shard_clips=PER_SHARD)
    assert ingest_clips([str(src)], str(out), cfg, progress=False).num_samples == N
    return out


@pytest.fixture(scope="module")
def all_keys(dataset) -> list[str]:
    index = json.loads((dataset / "index.json").read_text())
    keys = []
    for shard in index["shards"]:
        with tarfile.open(dataset / shard["name"]) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    assert len(keys) == N == len(set(keys)) and len(index["shards"]) == 8
    return keys


@pytest.fixture(scope="module")
def tokenized(dataset) -> tuple[Path, str]:
    """The data set with a token store from a freshly initialised tokenizer (tokens/<id>/)."""
    torch.manual_seed(0)
    cfg = tok_cfg(FRAMES, SIZE)
    tok_dir = dataset.parent / "tok"
    tid = save_tokenizer(Tokenizer(cfg).eval(), tok_dir)
    summary = ingest_tokens(str(dataset), str(tok_dir), batch_size=8, device="cpu", progress=False)
    assert summary.num_valid == N
    return dataset, tid


def epoch_keys(loader: ClipLoader) -> list[list[str]]:
    return [batch["keys"] for batch in loader]


def test_one_epoch_gives_every_sample_once(dataset, all_keys):
    loader = ClipLoader(str(dataset), 4, decoder="pyav", drop_last=False, epochs=1, shuffle_buffer=8)
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(all_keys) and keys != all_keys
    assert [len(b["keys"]) for b in batches] == [4] * 7 + [2]
    first = batches[0]
    assert first["video"].shape == (4, 3, FRAMES, SIZE, SIZE) and first["video"].dtype == torch.float32
    assert float(first["video"].min()) >= 0.0 and float(first["video"].max()) <= 1.0 and first["epoch"] == 0
    assert loader.stats["samples"] == N and loader.stats["skipped"] == 0 and loader.stats["bytes_read"] > 0
    assert "codes" not in first


def test_ranks_split_disjointly_and_orders_are_seeded(dataset, all_keys):
    def keys(rank: int = 0, world: int = 1, seed: int = 0, epochs: int = 1) -> list[list[str]]:
        loader = ClipLoader(
            str(dataset), 8, decoder="pyav", rank=rank, world_size=world, seed=seed, epochs=epochs
        )
        loader.drop_last, loader.even_batches = False, False  # every sample, however the ranks divide
        per_epoch: list[list[str]] = [[] for _ in range(epochs)]
        for batch in loader:
            per_epoch[batch["epoch"]] += batch["keys"]
        return per_epoch

    r0, r1 = keys(0, 2)[0], keys(1, 2)[0]
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(all_keys)
    e0, e1 = keys(epochs=2)
    assert sorted(e0) == sorted(e1) == sorted(all_keys) and e0 != e1
    assert keys()[0] == e0 and keys(seed=1)[0] != e0
    with pytest.raises(LoaderError, match="cannot split 8 shards over 9 ranks"):
        ClipLoader(str(dataset), 4, rank=0, world_size=9)


def test_even_batches_across_ranks(dataset):
    def run(rank: int) -> tuple[list[int], ClipLoader]:
        loader = ClipLoader(str(dataset), 2, decoder="pyav", rank=rank, world_size=3, epochs=1)
        return [len(b["keys"]) for b in loader], loader

    (a, loader), (b, _), (c, _) = run(0), run(1), run(2)  # 8 shards of 4, 4, ..., 2 over 3 ranks
    assert a == b == c == [2] * loader.batches_per_epoch(0) and len(a) >= 3
    uneven = ClipLoader(str(dataset), 4, decoder="pyav", world_size=3, epochs=1, even_batches=False)
    assert uneven.batches_per_epoch(0) is None


@pytest.mark.parametrize("stop_after", [3, 7, 9])  # mid-epoch, exactly at the epoch's end, in epoch 1
def test_resume_gives_the_same_samples(dataset, stop_after):
    def make() -> ClipLoader:
        return ClipLoader(str(dataset), 4, decoder="pyav", epochs=2, shuffle_buffer=16, seed=5)

    full = [(b["epoch"], b["keys"]) for b in make()]
    assert len(full) == 14  # 30 samples, 7 full batches of 4 per epoch

    first = make()
    it = iter(first)
    head = [(b["epoch"], b["keys"]) for b in (next(it) for _ in range(stop_after))]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    decoded: list[int] = []
    decode = resumed._decode
    resumed._decode = lambda clips: (decoded.append(len(clips)), decode(clips))[1]  # type: ignore[method-assign]
    assert head + [(b["epoch"], b["keys"]) for b in resumed] == full
    assert sum(decoded) == resumed.stats["samples"] == 4 * (14 - stop_after)  # replay decodes nothing

    with pytest.raises(LoaderError, match="seed=5"):
        ClipLoader(str(dataset), 4, seed=6).load_state_dict(state)


def test_user_errors_are_one_clear_message(dataset, tmp_path):
    with pytest.raises(LoaderError, match="not a complete data set"):
        ClipLoader(str(tmp_path), 4)
    with pytest.raises(LoaderError, match=r"no token store .*tokens/nope"):
        ClipLoader(str(dataset), 4, tokens="nope")
    with pytest.raises(LoaderError, match="rank=2 of world_size=2"):
        ClipLoader(str(dataset), 4, rank=2, world_size=2)


def test_codes_and_priority_are_joined_by_key(tokenized, tmp_path):
    root, tid = tokenized
    group = zarr.open_group(str(root / "tokens" / tid), mode="r", zarr_format=3)
    row_of = {k: i for i, k in enumerate(decode_keys(group["keys"][:])) if k}
    codes, priority = group["codes"][:], group["priority"][:]

    loader = ClipLoader(str(root), 4, tokens=tid, decoder="pyav", epochs=1)
    n = 0
    for batch in loader:
        assert batch["codes"].shape == (4, *GRID) and batch["codes"].dtype == torch.int64
        assert batch["priority"].shape == (4, *GRID) and batch["priority"].dtype == torch.float32
        rows = [row_of[k] for k in batch["keys"]]
        assert torch.equal(batch["codes"], torch.from_numpy(codes[rows].astype(np.int64)))
        assert torch.equal(batch["priority"], torch.from_numpy(priority[rows].astype(np.float32)))
        n += 1
    assert n == 7

    # a row the tokenizer could not fill (valid=False) is skipped, and the batches stay full
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    dropped = decode_keys(group["keys"][:1])[0]
    zarr.open_group(str(copy / "tokens" / tid), mode="a", zarr_format=3)["valid"][0] = False
    loader = ClipLoader(str(copy), 4, tokens=tid, decoder="pyav", epochs=1, drop_last=False)
    keys = [k for b in loader for k in b["keys"]]
    assert dropped not in keys and len(keys) == N - 1 and loader.stats["skipped"] == 1


def test_a_corrupt_clip_is_skipped_and_the_batch_refilled(dataset, all_keys, tmp_path):
    pytest.importorskip("nvidia.dali")
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    shard = copy / "shards" / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_key = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == f"{bad_key}.webm":
                data = bytes(range(256)) * 40
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))

    loader = ClipLoader(str(copy), 4, decoder="auto", epochs=1, decoder_kwargs={"device": "cpu"})
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert [b["video"].shape[0] for b in batches] == [4] * 7 and all(len(b["keys"]) == 4 for b in batches)
    assert bad_key not in keys and len(set(keys)) == 28 and set(keys) < set(all_keys)
    assert loader.stats["skipped"] == 1


def test_pyav_batches_held_while_the_next_decode_stay_as_decoded(dataset, tmp_path):
    """PyAVClipDecoder reuses its batch tensors: batches read ahead by a thread (as the trainer reads them)
    and kept, all of them or a few at a time, still hold their own clips; with a corrupt clip in the data
    (a batch refilled, torch.cat of two decodes)."""
    from train.decoders import PyAVClipDecoder

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    clips: dict[str, bytes] = {}
    for shard in sorted((copy / "shards").glob("*.tar")):
        with open(shard, "rb") as f:
            clips |= {key: parts["webm"] for key, parts in tar_samples(f)}
    shard = copy / "shards" / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (m, data) in enumerate(members):
            if i == 0:
                data = m.size * b"x"
            tar.addfile(m, io.BytesIO(data))
    reference = PyAVClipDecoder(FRAMES, SIZE, num_threads=1, pool=0)  # fresh tensors, never reused

    def check(batch: dict) -> None:
        expected, bad = reference.decode([clips[k] for k in batch["keys"]])
        assert bad == [] and torch.equal(batch["video"], expected)

    loader = ClipLoader(str(copy), 4, decoder="pyav", epochs=2, shuffle_buffer=8)
    kept = list(prefetch(iter(loader), 2))
    assert len(kept) == 14 and loader.stats["skipped"] == 2  # the corrupt clip, once per epoch
    for batch in kept:
        check(batch)
    # every batch is still held; only the two decodes a refilled batch was concatenated from were free
    assert loader._decoder.buffers.reused <= 2 * loader.stats["skipped"]

    loader = ClipLoader(str(copy), 4, decoder="pyav", epochs=2, shuffle_buffer=8)
    window: list[dict] = []
    for batch in prefetch(iter(loader), 2):
        window = [*window[-2:], batch]  # the consumer holds three batches at a time
        for held in window:
            check(held)
    assert loader._decoder.buffers.reused > 0


def test_object_storage_gives_the_same_batches(tokenized, s3_bucket):
    root, tid = tokenized
    url, options = s3_bucket
    store = Store(f"{url}/ds", options)
    store.fs.put(str(root), store.root, recursive=True)

    def run(dataset_url: str, storage_options: dict | None) -> list[tuple[list[str], torch.Tensor]]:
        loader = ClipLoader(
            dataset_url, 4, tokens=tid, decoder="pyav", epochs=1, storage_options=storage_options
        )
        assert loader.tokens is not None
        loader.tokens.group = None  # array handles are opened once: no batch looks the group up again
        return [(b["keys"], b["codes"], b["video"]) for b in loader]

    local, remote = run(str(root), None), run(f"{url}/ds", options)
    assert len(local) == len(remote) == 7
    for (k1, c1, v1), (k2, c2, v2) in zip(local, remote):
        assert k1 == k2 and torch.equal(c1, c2) and torch.equal(v1, v2)
