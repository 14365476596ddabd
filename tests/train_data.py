"""A tiny training data set for trainer and monitoring tests: 8-frame 32 px VP9 clips of the four real
sample videos, with the token store of a freshly initialised tokenizer (8 px patches: 4 x 4 x 4 tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.tokens import ingest_tokens
from lvmae.config import TokenizerConfig, VideoSpec
from lvmae.tokenizer import Tokenizer, save_tokenizer

REPO = Path(__file__).resolve().parents[1]
VIDEO = ["model.video.num_frames=8", "model.video.img_size=32", "model.video.patch_size=8"]


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, sample_videos) -> tuple[Path, str]:
    """(the data set's root, the id of its token set)."""
    root = tmp_path_factory.mktemp("train")
    spec = ClipSpec(num_frames=8, size=32)
    sources = [str(p) for p in sample_videos.values()]
    summary = ingest_clips(
        sources, str(root / "data"), IngestConfig(clip=spec, shard_clips=8), progress=False
    )
    assert summary.num_samples >= 40
    torch.manual_seed(0)
    tok = TokenizerConfig(
        video=VideoSpec(num_frames=8, img_size=32, patch_size=8),
        base_channels=8,
        channel_mult=[1, 1, 2, 2],
        num_groups=4,
        scorer_channels=8,
        fsq_levels=[8, 5, 5],
    )
    tid = save_tokenizer(Tokenizer(tok).eval(), root / "tokenizer")
    ingest_tokens(str(root / "data"), str(root / "tokenizer"), device="cpu", progress=False)
    return root / "data", tid


def tiny_mae_args(data: tuple[Path, str], out: Path, *extra: str) -> list[str]:
    """`train mae` on the demo recipe, shrunk to the tiny data set (overrides in `extra` win)."""
    url, tid = data
    return [
        "train",
        "mae",
        str(REPO / "configs/demo_cpu.yaml"),
        *VIDEO,
        "model.target.fsq_levels=[8,5,5]",
        f"data.url={url}",
        f"data.tokens={tid}",
        "data.batch_size=2",
        "data.shuffle_buffer=8",
        "optim.warmup_steps=3",
        "run.keep_last=2",
        "run.metrics_port_base=0",
        f"run.out={out}",
        *extra,
    ]
