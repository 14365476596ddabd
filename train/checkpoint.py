"""Checkpoints of a DeepSpeed run: atomic, the last K kept, resumed from the newest complete one.

Layout under RUN/checkpoints/ (a local or shared filesystem that every rank sees):

    step-00000100/           one checkpoint: DeepSpeed's files (ZeRO shards of the parameters and the
                             optimizer state, the module states with the lr scheduler), plus
        rank-00000.json      per rank: the loader's position and the RNG states
        config.yaml          the resolved training config (credentials redacted)
        meta.json            {"step", "world_size", ...}, written last
    latest                   the name of the newest complete checkpoint (replaced atomically)
    .tmp-step-00000200/      a save under way, or one that a killed run left; removed at the next start

A save writes everything into .tmp-step-N, meets every rank at a barrier, and only then does rank 0
rename the folder to step-N, point `latest` at it and delete checkpoints beyond the last K. A run killed
in the middle of a save leaves a .tmp- folder and the previous checkpoint and `latest` untouched.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvmae.weights import write_text_atomically

LATEST = "latest"
META = "meta.json"
_STEP = re.compile(r"^step-(\d{8})$")


class CheckpointError(Exception):
    """A checkpoint cannot be used (missing, incomplete, from another world size): a user error."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's random number generators (torch, CUDA, numpy, random) as JSON-able values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


class Checkpoints:
    """RUN/checkpoints of one run, seen from one rank (see the module docstring for the layout)."""

    def __init__(self, directory: str | os.PathLike[str], rank: int, world_size: int, keep_last: int):
        self.dir = Path(directory)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints here, oldest first."""
        if not self.dir.is_dir():
            return []
        found = (_STEP.match(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (self.dir / m.group(0) / META).is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the one `latest` names (or, if that file is missing, the newest
        step-N with its meta.json)."""
        pointer = self.dir / LATEST
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if (path / META).is_file():
                return path
        steps = self.steps()
        return self.dir / step_name(steps[-1]) if steps else None

    def remove_stale(self) -> list[str]:
        """Rank 0, before training: delete the .tmp- folders of saves a killed run never finished."""
        stale = sorted(self.dir.glob(".tmp-*")) if self.dir.is_dir() else []
        for p in stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return [p.name for p in stale]

    def save(self, engine: Any, step: int, rank_state: dict[str, Any], config_yaml: str) -> Path:
        """Collective (every rank calls it). -> the new checkpoint's folder."""
        import torch.distributed as dist

        name = step_name(step)
        tmp_name = f".tmp-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        # save_latest=False: DeepSpeed's own `latest` would be written before the rename below.
        engine.save_checkpoint(str(self.dir), tag=tmp_name, save_latest=False)
        tmp = self.dir / tmp_name
        state = {**rank_state, "rng": rng_state()}
        write_text_atomically(tmp / f"rank-{self.rank:05d}.json", json.dumps(state))
        _barrier(dist)
        final = self.dir / name
        if self.rank == 0:
            write_text_atomically(tmp / "config.yaml", config_yaml)
            meta = {"step": step, "world_size": self.world_size, "time": time.time()}
            write_text_atomically(tmp / META, json.dumps(meta, indent=1) + "\n")
            if final.exists():  # a checkpoint of this step from an earlier attempt: the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomically(self.dir / LATEST, name + "\n")
            self._prune()
        _barrier(dist)  # nobody goes on (or reads `latest`) before the rename
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for step in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.dir / step_name(step), ignore_errors=True)

    def load(self, engine: Any, path: Path) -> tuple[int, dict[str, Any]]:
        """Collective. Restore the engine (parameters, optimizer, lr scheduler) and this process's RNG
        states from checkpoint `path`; -> (its step, this rank's saved state, e.g. the loader's)."""
        meta_path = path / META
        if not meta_path.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {META})")
        meta = json.loads(meta_path.read_text())
        if meta["world_size"] != self.world_size:
            raise CheckpointError(
                f"{path} was saved by {meta['world_size']} ranks, this run has {self.world_size}: resume "
                "with the same number of processes (ZeRO-3 shards and loader positions are per rank)"
            )
        rank_file = path / f"rank-{self.rank:05d}.json"
        if not rank_file.is_file():
            raise CheckpointError(f"{path} has no state for rank {self.rank} ({rank_file.name})")
        load_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        state = json.loads(rank_file.read_text())
        set_rng_state(state.pop("rng"))
        return int(meta["step"]), state


def _barrier(dist: Any) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
