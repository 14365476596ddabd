"""The token store's on-disk format: the frozen tokenizer's codes and priorities, in a Zarr v3 group.

Layout under DATASET/tokens/<tokenizer-id>/ (a Zarr v3 group, local or s3:// through fsspec):
  codes      [N, T', H', W'] int16 (int32 if the codebook has more than 32768 codes), fill -1
  priority   [N, T', H', W'] float32 scorer logits (higher: more important), fill 0
  keys       [N, L] uint8: the sample KEY in UTF-8, zero-padded to L = `key_bytes` bytes (an attribute), fill 0
  valid      [N] bool, fill False: True where the row holds a tokenized clip
  _done/shard-NNNNNN.json   a clip shard's commit marker {shard, plan, samples, errors}
  errors.jsonl              every skipped sample {key, shard, reason, detail}

Rows: the sample at position i of clip shard k (tar order) is row k * S + i, where S (`rows_per_shard`) is
the largest sample count of any clip shard and N = (last shard number + 1) * S. codes and priority are
chunked one sample per chunk and sharded S samples per Zarr shard; keys and valid have one chunk of S rows.
So each clip shard owns exactly one object of each array and is written (or rewritten, on resume) alone.
The group attributes describe the tokenizer and the layout; `complete: true` is written last.

Every array has a data type of the Zarr v3 core spec, so any Zarr v3 implementation reads the store
(tensorstore included; the attributes are plain JSON in zarr.json). Read keys with `decode_keys`.
Here: opening a store (open_tokens), creating or checking its arrays and layout (prepare), its format
check (check_format) and the key rows (encode_keys, decode_keys). ingest.tokens fills it.

Format 3 stores keys as zero-padded UTF-8 bytes. Format 2 stored them in zarr-python's variable-length
string type, which is not in the Zarr v3 core spec (tensorstore refuses it); format 1 also stored sigmoid
scores in float16, which rounds every saturated score to the same value (and top-k then breaks the ties by
index). Both are refused, with a message to rebuild.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ingest.storage import Store

FORMAT_VERSION = 3
KEY_BYTES = (
    32  # a sample KEY (ingest.clip_plan.sample_key) is 26 or 27 bytes: 16 hex digits, "_", ["t",] 9 digits
)
_LAYOUT_KEYS = ("format_version", "tokenizer_id", "source_plan", "rows_per_shard", "num_rows", "grid")


class TokensError(Exception):
    """Tokenizing cannot go on (no data set, a mismatched tokenizer, --strict): a user error."""


def open_tokens(store: Store, rel: str, read_only: bool = True):
    """The Zarr v3 group at `rel` below the data set root, through fsspec (one code path: local and s3)."""
    import zarr

    options = dict(store.storage_options)
    if store.local:
        options.setdefault("auto_mkdir", True)
    zstore = zarr.storage.FsspecStore.from_url(store.uri(rel), storage_options=options, read_only=read_only)
    return zarr.open_group(store=zstore, mode="r" if read_only else "a", zarr_format=3)


def encode_keys(keys: list[str], width: int = KEY_BYTES) -> np.ndarray:
    """Sample keys -> rows of the `keys` array: [len(keys), width] uint8, UTF-8 zero-padded ("" -> zeros)."""
    data = [k.encode("utf-8") for k in keys]
    for key, raw in zip(keys, data):
        if len(raw) > width or b"\0" in raw:
            raise TokensError(
                f"sample key {key!r} is {len(raw)} bytes in UTF-8"
                + (" with a NUL byte" if b"\0" in raw else "")
                + f": a token store holds keys of up to {width} bytes and no NUL (ingest clips writes 26)"
            )
    return np.array(data, dtype=f"S{width}").view(np.uint8).reshape(len(keys), width)


def decode_keys(rows: np.ndarray) -> list[str]:
    """Rows of the `keys` array ([n, L] uint8, zero-padded UTF-8) -> the sample keys ("" for an empty row)."""
    packed = np.ascontiguousarray(rows, dtype=np.uint8).view(f"S{rows.shape[-1]}").reshape(len(rows))
    return [raw.decode("utf-8") for raw in packed.tolist()]  # numpy drops the padding: trailing zeros


_OLD_FORMATS = {
    1: "format 1 rounded priorities to float16, which ties saturated scores: delete it and run lvmae ingest "
    "tokens again with a tokenizer trained by this version",
    2: "format 2 stored keys in zarr-python's variable-length strings, which other Zarr v3 readers such as "
    "tensorstore refuse: delete it and run lvmae ingest tokens again (its tokenizer will do)",
}


def check_format(attrs: dict[str, Any], url: str) -> None:
    """Raise TokensError unless a token store's attributes (empty: a new store) are of FORMAT_VERSION."""
    version = attrs.get("format_version", FORMAT_VERSION) if attrs else FORMAT_VERSION
    if version != FORMAT_VERSION:
        why = _OLD_FORMATS.get(version, "delete it and run lvmae ingest tokens again")
        raise TokensError(
            f"{url} is a token store of format {version}; this lvmae reads format {FORMAT_VERSION} "
            f"(float32 priority logits, keys as zero-padded UTF-8 bytes; {why})"
        )


def prepare(group: Any, attrs: dict[str, Any], code_dtype: str, url: str) -> None:
    """Create the arrays and attributes, or check that an existing store has the same layout."""
    old = dict(group.attrs)
    check_format(old, url)
    layout = {**attrs, "key_bytes": KEY_BYTES}
    differ = [k for k in (*_LAYOUT_KEYS, "key_bytes") if old and old.get(k) != layout[k]]
    if differ:
        raise TokensError(
            f"{url} holds tokens of another data set or layout ({', '.join(differ)} differ): delete it to rebuild"
        )
    if not old:
        group.attrs.update({**layout, "complete": False})
    n, s, grid = attrs["num_rows"], attrs["rows_per_shard"], attrs["grid"]
    per_sample = dict(shape=(n, *grid), chunks=(1, *grid), shards=(s, *grid))
    specs = {
        "codes": dict(per_sample, dtype=code_dtype, fill_value=-1),
        "priority": dict(per_sample, dtype="float32", fill_value=0),
        "keys": dict(shape=(n, KEY_BYTES), chunks=(s, KEY_BYTES), dtype="uint8", fill_value=0),
        "valid": dict(shape=(n,), chunks=(s,), dtype=bool, fill_value=False),
    }
    for name, spec in specs.items():
        if name not in group:  # by name: listing the group would trip over _done/ and errors.jsonl
            group.create_array(name, **spec)
