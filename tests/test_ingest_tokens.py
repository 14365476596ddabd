"""`lvmae ingest tokens`: the Zarr token store holds exactly the frozen tokenizer's output on the clips the
loader will decode, in the specified row layout; resumable per shard; bad samples skipped and reported."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from videos import write_ramp_video

from ingest.clip_decode import decode_clip, to_model_input
from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.storage import Store
from ingest.token_store import KEY_BYTES, decode_keys, encode_keys
from ingest.tokens import TokensError, ingest_tokens
from lvmae.config import VideoSpec
from lvmae.tokenizer import Tokenizer, save_tokenizer
from lvmae.tokenizer_config import TokenizerConfig
from lvmae_cli.main import main as lvmae_main

FRAMES, SIZE, PER_SHARD = 16, 32, 5
GRID = (8, 4, 4)  # 16 frames / tubelet 2, 32 px / patch 8
ARRAYS = ("codes", "priority", "keys", "valid")


def tok_cfg(num_frames: int = FRAMES, img_size: int = SIZE) -> TokenizerConfig:
    video = VideoSpec(num_frames=num_frames, img_size=img_size, patch_size=8, tubelet_size=2)
    return TokenizerConfig(
        video=video,
        base_channels=8,
        channel_mult=[1, 1, 2, 2],
        num_groups=4,
        scorer_channels=8,
        fsq_levels=[8, 5, 5],
    )


def tree_state(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def read_store(root: Path, tid: str) -> tuple[dict[str, np.ndarray], dict, zarr.Group]:
    """The arrays (keys decoded to strings), the attributes and the group."""
    group = zarr.open_group(str(root / "tokens" / tid), mode="r", zarr_format=3)
    arrays = {name: group[name][:] for name in ARRAYS}
    arrays["keys"] = np.array(decode_keys(arrays["keys"]))
    return arrays, dict(group.attrs), group


def tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(out.items())


@pytest.fixture(scope="module")
def dataset(sample_videos, tmp_path_factory) -> Path:
    """14 real 16-frame 32 px clips in shards of 5, 5, 4."""
    src = tmp_path_factory.mktemp("src")
    for name in ("carphone_pristine", "carphone_distorted"):
        os.symlink(sample_videos[name], src / f"{name}.mp4")
    out = tmp_path_factory.mktemp("ds") / "ds"
    cfg = IngestConfig(clip=ClipSpec(num_frames=FRAMES, size=SIZE), shard_clips=PER_SHARD)
    summary = ingest_clips([str(src)], str(out), cfg, progress=False)
    assert summary.num_samples == 14
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> tuple[Path, Tokenizer, str]:
    torch.manual_seed(0)
    model = Tokenizer(tok_cfg()).eval()
    d = tmp_path_factory.mktemp("tok")
    return d, model, save_tokenizer(model, d)


@pytest.fixture(scope="module")
def tokenized(dataset, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenized") / "ds"
    shutil.copytree(dataset, root)
    summary = ingest_tokens(str(root), str(tokenizer[0]), batch_size=3, device="cpu", progress=False)
    return root, summary


def test_tokens_equal_the_tokenizer_on_decoded_clips(tokenized, tokenizer):
    root, summary = tokenized
    _, model, tid = tokenizer
    assert (summary.clips, summary.skipped, summary.shards, summary.shards_skipped) == (14, 0, 3, 0)
    assert summary.complete and summary.num_valid == 14 and summary.tokenizer_id == tid
    arrays, attrs, group = read_store(root, tid)
    index = json.loads((root / "index.json").read_text())
    assert attrs["complete"] is True and attrs["format_version"] == 3 and attrs["tokenizer_id"] == tid
    assert (attrs["quantizer"], attrs["fsq_levels"], attrs["codebook_size"]) == ("fsq", [8, 5, 5], 200)
    assert attrs["grid"] == list(GRID) and attrs["rows_per_shard"] == PER_SHARD and attrs["num_rows"] == 15
    assert attrs["source_plan"] == index["plan"] and (attrs["num_samples"], attrs["num_errors"]) == (14, 0)
    codes, prio = group["codes"], group["priority"]
    assert codes.dtype == np.int16 and prio.dtype == np.float32 and codes.shape == prio.shape == (15, *GRID)
    assert codes.chunks == prio.chunks == (1, *GRID) and codes.shards == prio.shards == (PER_SHARD, *GRID)
    assert group["valid"].dtype == np.bool_ and group["keys"].shape == (15, KEY_BYTES) == (15, 32)
    assert group["keys"].dtype == np.uint8 and group["keys"].chunks == (PER_SHARD, 32)
    assert attrs["key_bytes"] == 32
    assert (root / "tokens" / tid / "errors.jsonl").read_text() == ""

    checked = 0
    for k, shard in enumerate(index["shards"]):
        record = json.loads((root / shard["name"].replace(".tar", ".json")).read_text())
        rows = slice(k * PER_SHARD, k * PER_SHARD + len(record["keys"]))
        assert list(arrays["keys"][rows]) == record["keys"] and arrays["valid"][rows].all()
        pad = slice(rows.stop, (k + 1) * PER_SHARD)  # rows past the shard's samples stay empty
        assert (arrays["keys"][pad] == "").all() and not arrays["valid"][pad].any()
        assert (arrays["codes"][pad] == -1).all()
        samples = tar_samples(root / shard["name"])
        assert [key for key, _ in samples] == record["keys"]
        for pos, (_key, parts) in enumerate(samples):
            x = to_model_input(decode_clip(parts["webm"], FRAMES)[None], "cpu")
            want_codes, want_prio = model.encode(x)
            row = k * PER_SHARD + pos
            np.testing.assert_array_equal(arrays["codes"][row], want_codes[0].numpy())
            # float32 logits: batched and single-clip runs agree to float rounding, not to float16's steps
            np.testing.assert_allclose(arrays["priority"][row], want_prio[0].numpy(), rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == 14


@pytest.mark.parametrize("version", [1, 2])
def test_a_token_store_of_an_old_format_is_refused(tokenized, tokenizer, tmp_path, version):
    # Format 1 stored float16 sigmoid scores, which tie once saturated; format 2 stored keys in zarr-python's
    # variable-length strings, which other Zarr v3 readers refuse: neither ingest (resuming into it) nor the
    # loader may use them, and both say what to do.
    from train.loader import ClipLoader, LoaderError

    root = tmp_path / "ds"
    shutil.copytree(tokenized[0], root)
    group = zarr.open_group(str(root / "tokens" / tokenizer[2]), mode="a", zarr_format=3)
    group.attrs["format_version"] = version
    why = {1: "float16", 2: "variable-length strings"}[version]
    with pytest.raises(
        TokensError, match=rf"format {version};.*{why}.*delete it and run lvmae ingest tokens again"
    ):
        ingest_tokens(str(root), str(tokenizer[0]), device="cpu", progress=False)
    with pytest.raises(LoaderError, match=rf"format {version};.*reads format 3"):
        ClipLoader(str(root), 2, tokens=tokenizer[2], decoder="pyav")


def test_keys_are_zero_padded_utf8_bytes():
    keys = ["0123456789abcdef_000000016", "", "é" * 16]
    rows = encode_keys(keys)
    assert rows.dtype == np.uint8 and rows.shape == (3, KEY_BYTES)
    assert bytes(rows[0]) == keys[0].encode() + bytes(KEY_BYTES - 26) and not rows[1].any()
    assert decode_keys(rows) == keys and decode_keys(encode_keys([])) == []
    with pytest.raises(TokensError, match=r"'x{33}' is 33 bytes in UTF-8: .*up to 32 bytes"):
        encode_keys(["x" * 33])
    with pytest.raises(TokensError, match="NUL"):
        encode_keys(["a\0b"])


def test_the_store_reads_in_tensorstore_bit_for_bit(tokenized, tokenizer):
    # Every array of the store in a second Zarr v3 implementation: only core-spec data types, so tensorstore
    # reads what zarr-python reads, byte for byte; the attributes are plain JSON.
    ts = pytest.importorskip("tensorstore")
    root = tokenized[0] / "tokens" / tokenizer[2]
    group = zarr.open_group(str(root), mode="r", zarr_format=3)
    meta = {p.parent.relative_to(root).as_posix(): json.loads(p.read_text()) for p in root.rglob("zarr.json")}
    assert meta["."]["node_type"] == "group" and meta["."]["attributes"] == dict(group.attrs)
    arrays = sorted(name for name, m in meta.items() if m["node_type"] == "array")
    assert arrays == sorted(ARRAYS)
    theirs = {}
    for name in arrays:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / name)}}
        theirs[name] = ts.open(spec, read=True).result().read().result()
        ours = group[name][:]
        assert theirs[name].dtype == ours.dtype and theirs[name].shape == ours.shape, name
        assert theirs[name].tobytes() == ours.tobytes(), name
    assert {name: meta[name]["data_type"] for name in arrays} == {
        "codes": "int16",
        "priority": "float32",
        "keys": "uint8",
        "valid": "bool",
    }
    records = [json.loads(p.read_text()) for p in sorted((tokenized[0] / "shards").glob("*.json"))]
    keys = decode_keys(theirs["keys"])
    assert [k for k in keys if k] == [k for r in records for k in r["keys"]]
    assert [bool(k) for k in keys] == theirs["valid"].tolist()


def test_resume_recomputes_only_missing_shards_and_a_rerun_is_a_no_op(tokenized, tokenizer, tmp_path):
    src, _ = tokenized
    tok_dir, _, tid = tokenizer
    root = tmp_path / "ds"
    shutil.copytree(src, root)
    before, _, _ = read_store(root, tid)
    store = root / "tokens" / tid
    untouched = {p: (store / p).read_bytes() for p in ("codes/c/0/0/0/0", "priority/c/2/0/0/0", "keys/c/0/0")}

    (store / "_done" / "shard-000001.json").unlink()
    group = zarr.open_group(str(store), mode="a", zarr_format=3)
    group["codes"][5:10] = 7  # a half-written shard, as a crash would leave it
    group["priority"][5:10] = 0
    group["valid"][5:10] = False
    # The batch size of the first run: float32 logits show batch-dependent rounding (about 1e-6) that
    # float16 used to hide, and the store must come back bit-identical.
    summary = ingest_tokens(str(root), str(tok_dir), batch_size=3, device="cpu", progress=False)
    assert (summary.clips, summary.skipped, summary.shards_skipped) == (5, 0, 2) and summary.complete
    after, attrs, _ = read_store(root, tid)
    for name in ARRAYS:
        np.testing.assert_array_equal(after[name], before[name])
    assert attrs["complete"] is True and {p: (store / p).read_bytes() for p in untouched} == untouched

    state = tree_state(root)
    summary = ingest_tokens(str(root), str(tok_dir), device="cpu", progress=False)
    assert (summary.clips, summary.skipped, summary.shards_skipped, summary.num_valid) == (0, 0, 3, 14)
    assert tree_state(root) == state  # nothing rewritten


def rewrite_tar(path: Path, replace: dict[str, dict[str, bytes]]) -> None:
    """Rewrite a clip shard, replacing some samples' parts (same order, deterministic headers)."""
    samples = tar_samples(path)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, data in {**parts, **replace.get(key, {})}.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def with_sha(meta: bytes, data: bytes) -> bytes:
    return json.dumps({**json.loads(meta), "sha256": hashlib.sha256(data).hexdigest()}).encode()


def test_bad_samples_are_skipped_and_reported(dataset, tokenized, tokenizer, tmp_path):
    tok_dir, _, tid = tokenizer
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    shard = root / "shards" / "shard-000001.tar"
    samples = tar_samples(shard)
    keys = [key for key, _ in samples]
    garbage = b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8  # EBML magic, then nonsense
    short = write_ramp_video(
        tmp_path / "short.webm", frames=12, size=(SIZE, SIZE), codec="libvpx-vp9"
    ).read_bytes()
    rewrite_tar(
        shard,
        {
            keys[1]: {"webm": garbage, "json": with_sha(samples[1][1]["json"], garbage)},
            keys[2]: {"webm": short, "json": with_sha(samples[2][1]["json"], short)},
            keys[3]: {"webm": samples[3][1]["webm"][:-50]},  # truncated: its checksum no longer matches
        },
    )

    with pytest.raises(TokensError, match=rf"{keys[1]}: corrupt: .*--strict"):
        ingest_tokens(str(root), str(tok_dir), device="cpu", progress=False, strict=True)
    store = root / "tokens" / tid
    assert sorted(os.listdir(store / "_done")) == ["shard-000000.json"]  # the bad shard is not committed
    assert zarr.open_group(str(store), mode="r").attrs["complete"] is False

    summary = ingest_tokens(str(root), str(tok_dir), batch_size=2, device="cpu", progress=False, workers=2)
    assert (summary.clips, summary.skipped, summary.shards_skipped, summary.num_valid) == (6, 3, 1, 11)
    errors = [json.loads(line) for line in (store / "errors.jsonl").read_text().splitlines()]
    got = {e["key"]: (e["shard"], e["reason"]) for e in errors}
    name = "shards/shard-000001.tar"
    assert got == {keys[1]: (name, "corrupt"), keys[2]: (name, "frame_count"), keys[3]: (name, "checksum")}
    assert "12 frames" in next(e["detail"] for e in errors if e["reason"] == "frame_count")

    arrays, attrs, _ = read_store(root, tid)
    good, _, _ = read_store(tokenized[0], tid)
    bad_rows = [PER_SHARD + 1, PER_SHARD + 2, PER_SHARD + 3]
    assert attrs["complete"] is True and attrs["num_errors"] == 3
    assert list(arrays["keys"]) == list(good["keys"])  # skipped samples keep their key and row
    assert list(np.flatnonzero(good["valid"] & ~arrays["valid"])) == bad_rows
    assert (arrays["codes"][bad_rows] == -1).all() and (arrays["priority"][bad_rows] == 0).all()
    ok = arrays["valid"]
    np.testing.assert_array_equal(arrays["codes"][ok], good["codes"][ok])
    # Batches of other sizes (skipped samples leave gaps): float32 logits agree to rounding.
    np.testing.assert_allclose(arrays["priority"][ok], good["priority"][ok], rtol=1e-5, atol=1e-6)


def test_a_truncated_shard_keeps_what_it_can_read(dataset, tokenized, tokenizer, tmp_path):
    tok_dir, _, tid = tokenizer
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    shard = root / "shards" / "shard-000002.tar"
    keys = [key for key, _ in tar_samples(shard)]
    with tarfile.open(shard) as tar:  # cut inside the third sample's clip bytes
        cut = next(m for m in tar.getmembers() if m.name == f"{keys[2]}.webm").offset_data + 100
    shard.write_bytes(shard.read_bytes()[:cut])

    summary = ingest_tokens(str(root), str(tok_dir), device="cpu", progress=False)
    assert (summary.clips, summary.skipped) == (12, 2) and summary.complete
    assert {(e["key"], e["reason"]) for e in summary.errors} == {
        (keys[2], "bad_shard"),
        (keys[3], "bad_shard"),
    }
    arrays, _, _ = read_store(root, tid)
    good, _, _ = read_store(tokenized[0], tid)
    assert list(arrays["keys"]) == list(good["keys"])
    assert list(np.flatnonzero(good["valid"] & ~arrays["valid"])) == [12, 13]
    np.testing.assert_array_equal(arrays["codes"][:12], good["codes"][:12])


def test_object_storage_gives_the_same_store(s3_bucket, sample_videos, tokenized, tokenizer, tmp_path):
    url, options = s3_bucket
    tok_dir, _, tid = tokenizer
    src = tmp_path / "src"
    src.mkdir()
    for name in ("carphone_pristine", "carphone_distorted"):
        os.symlink(sample_videos[name], src / f"{name}.mp4")
    clip = ClipSpec(num_frames=FRAMES, size=SIZE)
    cfg = IngestConfig(clip=clip, shard_clips=PER_SHARD, storage_options=options)
    ingest_clips([str(src)], f"{url}/ds", cfg, progress=False)
    summary = ingest_tokens(f"{url}/ds", str(tok_dir), device="cpu", storage_options=options, progress=False)
    assert (summary.clips, summary.store) == (14, f"{url}/ds/tokens/{tid}")
    group = zarr.open_group(
        zarr.storage.FsspecStore.from_url(summary.store, storage_options=options, read_only=True), mode="r"
    )
    good, attrs, _ = read_store(tokenized[0], tid)
    index = Store(f"{url}/ds", options).read_json("index.json")
    assert dict(group.attrs) == {**attrs, "source_plan": index["plan"]}  # the plan hashes source URIs
    for name in ("codes", "valid"):  # the same clips (under other keys: those hash URIs too)
        np.testing.assert_array_equal(group[name][:], good[name])
    # Batch size 8 here, 3 there: float32 logits agree to rounding.
    np.testing.assert_allclose(group["priority"][:], good["priority"], rtol=1e-5, atol=1e-6)
    assert len(set(np.array(decode_keys(group["keys"][:]))[good["valid"]])) == 14
    Store(f"{url}/ds", options).fs.rm_file(f"{summary.store.removeprefix('s3://')}/_done/shard-000002.json")
    again = ingest_tokens(f"{url}/ds", str(tok_dir), device="cpu", storage_options=options, progress=False)
    assert (again.clips, again.shards_skipped, again.complete) == (4, 2, True)
    np.testing.assert_array_equal(group["codes"][:], good["codes"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lvmae_cli", "ingest", "tokens", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_refuses_missing_index_and_mismatched_tokenizer(dataset, tmp_path):
    torch.manual_seed(0)
    other = tmp_path / "tok8"
    save_tokenizer(Tokenizer(tok_cfg(num_frames=8, img_size=32)), other)
    res = run_cli(str(dataset), "--tokenizer", str(other))
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "8-frame 32x32" in res.stderr and "16-frame 32x32" in res.stderr and str(other) in res.stderr

    res = run_cli(str(tmp_path / "nothing"), "--tokenizer", str(other))
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "not a complete data set" in res.stderr and "run lvmae ingest clips first" in res.stderr
    assert not (tmp_path / "nothing").exists()


def test_cli_summary_on_a_finished_store(tokenized, tokenizer, capsys):
    root, _ = tokenized
    tok_dir, _, tid = tokenizer
    assert (
        lvmae_main(["ingest", "tokens", str(root), "--tokenizer", str(tok_dir), "--device", "cpu", "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    assert "0 clips tokenized, 0 skipped (3 of 3 shards already done)" in out
    assert f"token store complete: {root}/tokens/{tid} (14 clips" in out
