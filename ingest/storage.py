"""Storage picked by URL scheme through fsspec: local paths by default, s3:// for clusters.

Writes are atomic: a reader sees the old object or the complete new one, never a part. Locally that is
a temporary name in the same folder and a rename; on object storage a single PUT is already atomic
(the object appears only when its upload completes).

On object storage every operation is retried through an outage (ingest.retry: backoff with jitter up to a
deadline, 5 minutes by default); local files fail at once.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ingest.retry import RetryPolicy, StoreRetry

T = TypeVar("T")


def storage_options_from_env(url: str) -> dict[str, Any]:
    """Options for s3:// from the standard environment: the endpoint (AWS_ENDPOINT_URL or
    AWS_ENDPOINT_URL_S3); keys and region are picked up by botocore itself from AWS_* variables and
    ~/.aws files, so they never pass through (or get logged by) this program."""
    if not url.startswith("s3://"):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


class Store:
    """A data set root (`url`) and the files below it, addressed by relative paths.

    retry: how operations on a remote store wait out failures (one StoreRetry can be shared by several
    stores and readers, so that its counters cover them all); default: a StoreRetry of `policy`
    (RetryPolicy()) for a remote store, none for a local one (a local error is not waited out)."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retry: StoreRetry | None = None,
        policy: RetryPolicy | None = None,
    ):
        self.url = url.rstrip("/")
        options = storage_options if storage_options is not None else storage_options_from_env(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.storage_options = options
        self.local = isinstance(self.fs, LocalFileSystem)
        self.retry = retry if retry is not None else None if self.local else StoreRetry(policy)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """fn(), retried through transient failures of a remote store (see ingest.retry)."""
        return fn() if self.retry is None else self.retry.call(fn, what)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.call(lambda: self.fs.exists(self.path(rel)), f"checking {self.uri(rel)}")

    def size(self, rel: str) -> int:
        return int(self.call(lambda: self.fs.size(self.path(rel)), f"sizing {self.uri(rel)}"))

    def read_bytes(self, rel: str) -> bytes:
        return self.call(lambda: self.fs.cat_file(self.path(rel)), f"reading {self.uri(rel)}")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def list(self, rel: str) -> list[str]:
        """Names (not paths) of the files directly in `rel`; empty if it does not exist."""
        try:
            entries = self.call(
                lambda: self.fs.ls(self.path(rel), detail=False, refresh=True), f"listing {self.uri(rel)}"
            )
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(str(e).rstrip("/")) for e in entries)

    def _parent(self, rel: str) -> None:
        if self.local:
            self.fs.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically create or replace `rel` with `data`."""
        self._parent(rel)
        if not self.local:
            self.call(lambda: self.fs.pipe_file(self.path(rel), data), f"writing {self.uri(rel)}")
            return

        def fill(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        self._replace_local(rel, fill)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def put_file(self, local_path: str, rel: str) -> None:
        """Atomically upload (or move into place) a finished local file."""
        self._parent(rel)
        if not self.local:
            self.call(lambda: self.fs.put_file(local_path, self.path(rel)), f"uploading {self.uri(rel)}")
            return

        def fill(tmp: str) -> None:
            self.fs.cp_file(local_path, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())

        self._replace_local(rel, fill)

    def _replace_local(self, rel: str, fill: Callable[[str], None]) -> None:
        """fill(a temporary name beside `rel`), then rename it over `rel`; no temporary is left behind."""
        tmp = f"{self.path(rel)}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fill(tmp)
            os.replace(tmp, self.path(rel))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def remove_stale_temporaries(self, rel_dir: str) -> int:
        """Delete leftovers of interrupted local writes (`*.tmp-*`); -> how many."""
        if not self.local:
            return 0
        removed = 0
        for name in self.list(rel_dir):
            if ".tmp-" in name:
                self.fs.rm_file(self.path(f"{rel_dir}/{name}"))
                removed += 1
        return removed
