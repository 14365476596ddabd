"""A small labelled data set a tiny encoder can learn: a square of the class colour over noise."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.presets import preset_config
from lvmae.weights import save_mae

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def write_colour_videos(root: Path, num: int, frames: int = 16, side: int = 32) -> Path:
    """A square of the class colour over noise, moving at random: solvable from any frame."""
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(num):
        name = list(COLOURS)[i % 3]
        with av.open(str(root / f"v{i:03d}.mp4"), "w") as out:
            st = out.add_stream("libx264", rate=25)
            st.width = st.height = side
            st.pix_fmt = "yuv420p"
            for _ in range(frames):
                img = rng.integers(0, 255, (side, side, 3)).astype(np.uint8)
                y, x = rng.integers(0, side // 2, 2)
                img[y : y + side // 2, x : x + side // 2] = COLOURS[name]
                out.mux(st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            out.mux(st.encode(None))
        rows.append(f"v{i:03d}.mp4,{name}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    """36 videos (16 frames, 32 px) in 3 classes, ingested with val 0.1 / test 0.25 shares, and the export
    of a freshly initialised tiny MAE on that clip (ROOT/data, ROOT/export)."""
    root = tmp_path_factory.mktemp("colours")
    manifest = write_colour_videos(root, 36)
    cfg = IngestConfig(clip=ClipSpec(num_frames=16, size=32), shard_clips=8, val_share=0.1, test_share=0.25)
    ingest_clips([str(manifest)], str(root / "data"), cfg, progress=False)
    cfg = preset_config("tiny", num_frames=16, img_size=32, patch_size=8)
    cfg.masking.decoder, cfg.target.kind = "random", "pixels"
    torch.manual_seed(0)
    model = MaskedVideoAutoencoder(cfg)
    save_mae(model.state_dict(), model.cfg, root / "export")
    return root
