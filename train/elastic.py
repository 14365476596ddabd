"""Resuming a run on another number of ranks than wrote its checkpoint (fewer after a node is lost, more
when a bigger allocation comes back):

    cfg, note = fit_world(cfg, saved, world_size)   # the global batch kept: micro batch x accumulation
    ... the engine loads the checkpoint through DeepSpeed's universal format (train.engine) ...
    loader.reshard(states)                          # the rest of the epoch cut into the new ranks' shares

The global batch (data.batch_size x data.grad_accum x ranks) is what the optimizer, the lr schedule and
the data order were set for, so it is kept: on M ranks the micro batch becomes the largest divisor of
G / M that is no larger than data.batch_size (never more memory per rank), and gradient accumulation makes
up the rest. Where M does not divide G the run cannot go on with the same global batch: UserError, with
the world sizes that would.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from lvmae.errors import UserError
from train.checkpoint import META, CheckpointError, Checkpoints, set_rng_state
from train.config import global_batch


def batch_plan(global_size: int, world_size: int, micro: int) -> tuple[int, int]:
    """-> (micro batch, gradient accumulation steps) that make `global_size` clips a step on `world_size`
    ranks, the micro batch at most `micro`."""
    if global_size % world_size:
        fits = [m for m in range(1, global_size + 1) if global_size % m == 0]
        raise UserError(
            f"the run's global batch of {global_size} clips cannot be split over {world_size} ranks: resume it "
            f"on a number of ranks that divides it ({', '.join(map(str, fits))}), or start a new run"
        )
    per_rank = global_size // world_size
    b = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    return b, per_rank // b


def saved_global_batch(meta: dict[str, Any], saved_cfg: dict[str, Any]) -> int:
    """The global batch of the run that wrote a checkpoint: its meta.json's, or for checkpoints written
    before it was recorded, data.batch_size x world size from its config.yaml (no accumulation then)."""
    if "global_batch" in meta:
        return int(meta["global_batch"])
    return int((saved_cfg.get("data") or {}).get("batch_size", 0)) * int(meta["world_size"])


def fit_world(
    cfg: Any, meta: dict[str, Any] | None, saved_cfg: dict[str, Any], world_size: int
) -> tuple[Any, str]:
    """The config this run trains with: `cfg` itself, unless it resumes a checkpoint (its meta.json `meta`,
    config.yaml `saved_cfg`) written by another number of ranks; then data.batch_size and data.grad_accum
    that keep the checkpoint's global batch. -> (config, a line saying what changed, or "")."""
    if meta is None or int(meta["world_size"]) == world_size:
        return cfg, ""
    size = saved_global_batch(meta, saved_cfg)
    micro, accum = batch_plan(size, world_size, cfg.data.batch_size)
    data = dataclasses.replace(cfg.data, batch_size=micro, grad_accum=accum)
    fitted = dataclasses.replace(cfg, data=data)
    assert global_batch(fitted, world_size) == size
    return fitted, (
        f"the checkpoint was written by {meta['world_size']} ranks, this run has {world_size}: global batch "
        f"{size} kept as {micro} clips x {accum} accumulation step(s) x {world_size} ranks"
    )


def converts(remote: bool, stage_dir: str | None, rank: int, local_rank: int) -> bool:
    """Whether this rank converts the checkpoint for the ranks that read its folder: rank 0 of a local (or
    shared) run folder; on object storage the first rank of each stage (every rank, with `{rank}` in
    run.stage_dir; else the first of each node)."""
    if not remote:
        return rank == 0
    return "{rank}" in (stage_dir or "") or local_rank == 0


def load_resized(
    ckpts: Checkpoints, engine: Any, path: Path, converter: bool, barrier: Any
) -> tuple[int, list]:
    """Collective. Restore `engine` from checkpoint `path`, written by another number of ranks: `converter`
    ranks (rank 0 of a run folder every rank sees; each node's first rank where each has its own stage)
    turn it into DeepSpeed's universal format in a scratch folder beside this run's checkpoints, every rank
    loads that (train.engine.load_universal_checkpoint), the scratch goes. Each rank takes the RNG states
    of the old rank of its number, where there was one. -> (step, every old rank's saved state)."""
    from train.engine import load_universal_checkpoint, to_universal

    meta = json.loads((path / META).read_text())  # fetched with the config (Trainer.fit_world)
    scratch = ckpts.dir / f".tmp-universal-{path.name}"  # .tmp-: a killed run's is removed at its next start
    if converter:  # on a store, every file to this node's stage: the other ranks here read the states
        ckpts.fetch(path, every_rank=True)
        shutil.rmtree(scratch, ignore_errors=True)
        to_universal(path, scratch)
    barrier()
    loaded = load_universal_checkpoint(engine, scratch)
    barrier()
    if converter:
        shutil.rmtree(scratch, ignore_errors=True)
        (ckpts.dir / "latest_universal").unlink(missing_ok=True)
    if not loaded:  # as Checkpoints.load says it
        raise CheckpointError(
            f"DeepSpeed could not load {ckpts.where(path)} (converted to its universal format)"
        )
    states = [json.loads((path / f"rank-{r:05d}.json").read_text()) for r in range(int(meta["world_size"]))]
    if ckpts.rank < len(states):
        set_rng_state(states[ckpts.rank]["rng"])
    return int(meta["step"]), states
