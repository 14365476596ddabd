"""The rows of bench/ablations.py and what each holds equal to the LVMAE row.

A row is a pretraining setting (overrides of configs/demo_128f_cpu.yaml) at a clip length. A 32-frame
row is compared with the 128-frame LVMAE row in one of three ways (Row.match):

- steps: the same steps and the same tokens per step (4 clips of 128 frames against 16 of 32), so the
  decoder's 15% budget is the same number of tokens; the comparison of the first ablation tables.
- flops: the same training compute: the 32-frame row's steps are the LVMAE row's times the ratio of their
  measured FLOPs per step (torch.utils.flop_counter, forward and backward of the model on one batch).
- memory: the same predicted peak memory in a training step (train.memory.plan_step, the model `lvmae
  plan` uses): the largest 32-frame batch whose step fits in what the LVMAE row's step needs. This is the
  paper's argument: at the memory of 128-frame adaptive decoding, a 32-frame model decodes every token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAE_RECIPE = REPO / "configs" / "demo_128f_cpu.yaml"
BASE_BATCH = 4  # 128-frame clips per step


@dataclass(frozen=True)
class Row:
    overrides: tuple[str, ...] = ()
    frames: int = 128
    match: str = "steps"  # steps | flops | memory (see the module docstring)


LVMAE = "adaptive 0.15, tokens (LVMAE)"
RANDOM_INIT = "random-init encoder (no pretraining)"
ROWS: dict[str, Row] = {
    "all (VideoMAE), tokens": Row(("model.masking.decoder=all",)),
    "random 0.15, tokens": Row(("model.masking.decoder=random",)),
    "running_cell 0.15, tokens": Row(("model.masking.decoder=running_cell",)),
    LVMAE: Row(),
    "adaptive 0.15 on frame difference, tokens": Row(("model.masking.priority=frame_diff",)),
    "adaptive 0.15 on learned + frame difference, tokens": Row(("model.masking.priority=combined",)),
    "adaptive 0.15, pixels": Row(("model.target.kind=pixels",)),
    "adaptive 0.15, tokens, 32 frames, equal steps": Row(frames=32),
    "adaptive 0.15, tokens, 32 frames, equal FLOPs": Row(frames=32, match="flops"),
    "all, tokens, 32 frames, equal peak memory": Row(("model.masking.decoder=all",), 32, "memory"),
}
# The differences the docs discuss: (row, minus row), each paired by seed.
COMPARISONS: list[tuple[str, str]] = [
    (LVMAE, RANDOM_INIT),
    (LVMAE, "random 0.15, tokens"),
    (LVMAE, "running_cell 0.15, tokens"),
    (LVMAE, "adaptive 0.15 on frame difference, tokens"),
    (LVMAE, "adaptive 0.15 on learned + frame difference, tokens"),
    (LVMAE, "adaptive 0.15, pixels"),
    (LVMAE, "all (VideoMAE), tokens"),
    (LVMAE, "adaptive 0.15, tokens, 32 frames, equal steps"),
    (LVMAE, "adaptive 0.15, tokens, 32 frames, equal FLOPs"),
    (LVMAE, "all, tokens, 32 frames, equal peak memory"),
]


def train_config(row: Row, batch: int):
    """The row's TrainConfig at `batch` clips per step (data set placeholders: nothing is read)."""
    from train.config import load_train_config

    over = [*row.overrides, f"model.video.num_frames={row.frames}", f"data.batch_size={batch}"]
    return load_train_config([str(MAE_RECIPE)], ["data.url=unused", "data.tokens=unused", *over])


@functools.cache
def flops_per_step(row: Row, batch: int) -> int:
    """Forward and backward FLOPs of one training step of the row's model at `batch` (matrix products and
    attention: what torch's FlopCounterMode counts), on random clips and codes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lvmae.losses import mae_loss
    from lvmae.mae import MaskedVideoAutoencoder

    cfg = train_config(row, batch).model_config()
    torch.manual_seed(0)
    model = MaskedVideoAutoencoder(cfg)
    v = cfg.video
    video = torch.rand(batch, 3, v.num_frames, v.img_size, v.img_size)
    codes = torch.randint(0, 10, (batch, *v.grid))
    priority = torch.rand(batch, *v.grid)
    plan = model.plan(batch, torch.Generator().manual_seed(0), priority)
    with FlopCounterMode(display=False) as counter:
        mae_loss(cfg, model(video, plan=plan), video=video, codes=codes).backward()
    return int(counter.get_total_flops())


def planned_bytes(row: Row, batch: int) -> int:
    """train.memory's predicted peak of one training step, as `lvmae plan` predicts it."""
    from train.memory import plan_step

    return plan_step(train_config(row, batch)).total


def schedule(name: str, steps: int) -> tuple[int, int, dict]:
    """-> (batch, steps, what was matched) for a row, given the LVMAE row's `steps` at BASE_BATCH."""
    row = ROWS[name]
    if row.match == "steps":
        return BASE_BATCH * 128 // row.frames, steps, {}
    ref = ROWS[LVMAE]
    if row.match == "flops":
        batch = BASE_BATCH * 128 // row.frames
        mine, theirs = flops_per_step(row, batch), flops_per_step(ref, BASE_BATCH)
        return batch, round(steps * theirs / mine), {"flops_per_step": mine, "lvmae_flops_per_step": theirs}
    if row.match == "memory":
        from train.memory import largest_batch

        budget = planned_bytes(ref, BASE_BATCH)
        batch = largest_batch(train_config(row, BASE_BATCH), budget)
        return batch, steps, {"planned_bytes": planned_bytes(row, batch), "lvmae_planned_bytes": budget}
    raise ValueError(f"row {name!r}: unknown match {row.match!r}")
