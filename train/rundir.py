"""A run's folder (`run.out`): a local (or shared) path, or a URL on object storage (s3://bucket/runs/x,
any fsspec URL).

A local run.out is used as it is: ranks write into it, nothing is copied. For a URL every node gets a
local stage folder that mirrors the run folder (config.yaml, train_log.jsonl, checkpoints/, export/,
summary.json): ranks write there as they would into a local run, then copy finished files up. Nodes
share nothing but the store. The stage is `run.stage_dir`, or by default

    $TMPDIR/lvmae-stage/<run name>-<10 hex of the URL>

(node-local on most clusters; `{node}` and `{rank}` in run.stage_dir are filled in, for a stage on a
filesystem that nodes share). The store's endpoint and keys come from the environment, as for clip
shards (ingest.storage.storage_options_from_env): nothing secret is passed, logged or saved here. Every store
operation is retried through an outage as ingest.storage.Store retries it.

    run = RunDir("s3://bucket/runs/x")
    run.local / "config.yaml"     # where this node writes it
    run.upload("config.yaml")     # -> s3://bucket/runs/x/config.yaml, one atomic PUT
    run.download("train_log.jsonl")
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
import uuid
from pathlib import Path

from ingest.storage import Store

STAGE_ROOT = "lvmae-stage"  # under the system temp folder: the default stages of remote runs


def is_url(out: str) -> bool:
    """Whether run.out names object storage (a URL) rather than a local path (file:// counts as local)."""
    return "://" in out and not out.startswith("file://")


def local_path(out: str) -> Path:
    """A local run.out as a path (file:///x -> /x)."""
    return Path(out[len("file://") :] if out.startswith("file://") else out)


def run_name(out: str) -> str:
    """The last component of run.out (path or URL): the run's name in metrics and messages."""
    return out.rstrip("/").rsplit("/", 1)[-1]


def default_stage_dir(url: str) -> Path:
    """$TMPDIR/lvmae-stage/<name>-<hash of the URL>: the same folder for the same URL on one machine."""
    key = hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / STAGE_ROOT / f"{run_name(url)}-{key}"


class RunDir:
    """run.out seen from one rank: `local`, the folder it writes (run.out itself, or the stage of a remote
    run), and `store`, the remote run folder files are uploaded to (None for a local run, where uploads
    and downloads do nothing)."""

    def __init__(self, out: str, stage_dir: str | None = None, *, rank: int = 0, node: int = 0):
        self.out = out.rstrip("/") if is_url(out) else out
        self.name = run_name(out)
        self.store: Store | None = None
        if is_url(out):
            stage = stage_dir.format(rank=rank, node=node) if stage_dir else None
            self.local = Path(stage) if stage else default_stage_dir(self.out)
            self.store = Store(self.out)  # endpoint and keys from the environment
        else:
            self.local = local_path(out)

    @property
    def remote(self) -> bool:
        return self.store is not None

    def __str__(self) -> str:
        return self.out if self.store is not None else str(self.local)

    def uri(self, rel: str) -> str:
        """Where the run's file `rel` lives for good: its URL on the store, or its local path."""
        return self.store.uri(rel) if self.store is not None else str(self.local / rel)

    def where(self, path: str | os.PathLike[str]) -> str:
        """A path under `local` as the run's own (remote) address, for messages and summaries."""
        if self.store is None:
            return str(path)
        try:
            rel = Path(path).relative_to(self.local)
        except ValueError:
            return str(path)
        return self.store.uri(rel.as_posix())

    def upload(self, rel: str) -> float:
        """Copy local file `rel` to the store (one atomic PUT); -> seconds taken (0 for a local run)."""
        if self.store is None:
            return 0.0
        started = time.perf_counter()
        self.store.put_file(str(self.local / rel), rel)
        return time.perf_counter() - started

    def upload_tree(self, rel: str) -> float:
        """Every file under local folder `rel`, to the same place on the store; -> seconds taken."""
        if self.store is None:
            return 0.0
        started = time.perf_counter()
        for path in sorted(p for p in (self.local / rel).rglob("*") if p.is_file()):
            self.store.put_file(str(path), path.relative_to(self.local).as_posix())
        return time.perf_counter() - started

    def exists(self, rel: str) -> bool:
        """Whether the run's file `rel` exists (on the store for a remote run; not from a cached listing)."""
        if self.store is None:
            return (self.local / rel).exists()
        self.store.fs.invalidate_cache()
        return self.store.exists(rel)

    def list(self, rel: str) -> list[str]:
        """Names in the run's folder `rel` (on the store, freshly listed, for a remote run)."""
        if self.store is None:
            d = self.local / rel
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        self.store.fs.invalidate_cache()
        return self.store.list(rel)

    def download(self, rel: str) -> bool:
        """Fetch the store's `rel` into the stage, replacing the local copy atomically (so ranks that share
        a stage may fetch the same file at once); -> False if the store has no such file."""
        if self.store is None:
            return (self.local / rel).is_file()
        return fetch_file(self.store, rel, self.local / rel)

    def download_tree(self, rel: str) -> int:
        """Every file under the store's folder `rel` into the stage; -> how many."""
        if self.store is None:
            return 0
        return fetch_tree(self.store, rel, self.local / rel)

    def remove(self, rel: str) -> None:
        """Delete the store's `rel` (a file, or a folder and everything in it); missing is fine."""
        if self.store is None:
            return
        store, path = self.store, self.store.path(rel)
        with contextlib.suppress(FileNotFoundError):
            store.call(lambda: store.fs.rm(path, recursive=True), f"deleting {store.uri(rel)}")
        with contextlib.suppress(FileNotFoundError):  # a folder's marker, which some stores (SeaweedFS) keep
            store.call(lambda: store.fs.rm_file(path + "/"), f"deleting {store.uri(rel)}/")
        store.fs.invalidate_cache()


def fetch_file(store: Store, rel: str, dest: Path) -> bool:
    """store/rel -> dest, via a temporary name beside it and a rename; -> False if there is no such file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        store.call(lambda: store.fs.get_file(store.path(rel), str(tmp)), f"downloading {store.uri(rel)}")
        os.replace(tmp, dest)
    except FileNotFoundError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def fetch_tree(store: Store, rel: str, dest: Path) -> int:
    """Every file below the store's folder `rel` into `dest` (same relative layout); -> how many."""
    store.fs.invalidate_cache()
    root = store.path(rel).rstrip("/")
    count = 0
    for path in sorted(store.call(lambda: store.fs.find(root), f"listing {store.uri(rel)}")):
        sub = str(path)[len(root) :].lstrip("/")
        if sub and fetch_file(store, f"{rel}/{sub}" if rel else sub, dest / sub):
            count += 1
    return count


def fetch_folder(url: str, dest: str | os.PathLike[str] | None = None) -> Path:
    """A folder on object storage (an export, a checkpoint) copied to `dest` (default: the stage of `url`,
    default_stage_dir) for readers that need files; -> the local folder. A local path is returned as is."""
    if not is_url(url):
        return local_path(url)
    target = Path(dest) if dest is not None else default_stage_dir(url)
    if fetch_tree(Store(url.rstrip("/")), "", target) == 0:
        raise FileNotFoundError(f"{url}: no such folder (or it is empty)")
    return target


__all__ = [
    "RunDir",
    "default_stage_dir",
    "fetch_file",
    "fetch_folder",
    "fetch_tree",
    "is_url",
    "local_path",
    "run_name",
]
