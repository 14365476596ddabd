"""Which checkpoint a run resumes from, and whether this run's config may resume it.

start = pick_checkpoint(ckpts, "auto")           # --resume none | auto | PATH
check_resumed_model(start / "config.yaml", cfg, ckpts.where(start))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from train.checkpoint import CheckpointError, Checkpoints


def pick_checkpoint(ckpts: Checkpoints, resume: str) -> Path | None:
    """--resume none (the default: refuse to train over existing checkpoints), auto, or a checkpoint path."""
    latest = ckpts.latest()
    if resume == "none":
        if latest is not None:
            raise CheckpointError(
                f"{ckpts.location} already holds checkpoints (newest: {latest.name}): pass --resume auto to "
                "continue that run, or set run.out to a new folder"
            )
        return None
    if resume == "auto":
        return latest
    return ckpts.named(resume)


def saved_config(path: Path) -> dict[str, Any]:
    """A checkpoint's config.yaml as a plain dict ({} when it has none)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        return {}
    raw = OmegaConf.to_container(OmegaConf.load(path))
    return raw if isinstance(raw, dict) else {}


def check_resumed_model(config_file: Path, cfg: Any, where: str) -> None:
    """Refuse to resume a checkpoint under options that change what its weights mean without changing their
    shapes: those a config section declares in its WEIGHT_MEANING (the model's position table and input
    normalization, a classifier's pooling). A checkpoint saved before such an option existed was trained
    with the section's SAVED_DEFAULTS value, whatever today's default."""
    if not config_file.is_file():
        return
    raw = saved_config(config_file)
    for field in dataclasses.fields(cfg):
        section = getattr(cfg, field.name)
        kind = type(section)
        keys: tuple[str, ...] = getattr(kind, "WEIGHT_MEANING", ())
        saved = {**getattr(kind, "SAVED_DEFAULTS", {}), **(raw.get(field.name) or {})}
        for key in keys:
            if key in saved and saved[key] != getattr(section, key):
                name = f"{field.name}.{key}"
                raise CheckpointError(
                    f"{where} was trained with {name}={saved[key]}, this run has {name}="
                    f"{getattr(section, key)}: pass {name}={saved[key]} to resume it"
                )
