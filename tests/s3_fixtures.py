"""S3 fixtures on a real local server (SeaweedFS `weed mini`, see ingest.objectstore); no mocks.

Register from tests/conftest.py with `pytest_plugins = ["s3_fixtures"]`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ingest.objectstore import LocalS3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """One local S3 server for the whole session (about 1 s to start, 3-4 s to stop)."""
    server = LocalS3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: LocalS3Server) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh bucket: ("s3://test-<8 hex>", storage options for s3fs/fsspec/zarr). Deleted afterwards:
    weed gives each bucket its own volume, and the number of volumes is bounded by free disk space."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    url = s3_server.create_bucket(name)
    yield url, s3_server.storage_options()
    s3_server.delete_bucket(name)
