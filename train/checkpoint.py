"""Checkpoints of a DeepSpeed run: atomic, the last K kept, resumed from the newest complete one.

Layout under RUN/checkpoints/ (a local or shared filesystem that every rank sees):

    step-00000100/           one checkpoint: DeepSpeed's files (ZeRO shards of the parameters and the
                             optimizer state, the module states with the lr scheduler), plus
        rank-00000.json      per rank: the loader's position and the RNG states
        config.yaml          the resolved training config (credentials redacted)
        meta.json            {"step", "world_size", "global_batch", ...}, written last
    latest                   the name of the newest complete checkpoint (replaced atomically)
    best.json                with run.keep_best: the checkpoint of the best in-run probe score, its step
                             and figures; kept beside the last K
    .tmp-step-00000200/      a save under way, or one that a killed run left; removed at the next start

A save writes everything into .tmp-step-N, meets every rank at a barrier, and only then does rank 0
rename the folder to step-N, point `latest` at it and delete checkpoints beyond the last K. A run killed
in the middle of a save leaves a .tmp- folder and the previous checkpoint and `latest` untouched.

On object storage (run.out a URL: `StoredCheckpoints`, train.rundir) the same layout lives on the store,
with each node's stage folder as the local copy. Object stores cannot rename, so a save uploads straight
into step-N/ and meta.json is the commit:

    1. every rank saves into STAGE/checkpoints/step-N/; rank 0 deletes any step-N/ on the store  barrier
    2. every rank uploads the files it wrote (its ZeRO shards and rank-K.json; rank 0 also those
       without a rank in their name)                                                            barrier
    3. rank 0 uploads the run files (train_log.jsonl), config.yaml, then meta.json, then `latest`, then
       prunes: old steps lose meta.json first, then the rest                                    barrier

A step-N/ without meta.json is an upload that a kill interrupted: never resumed from, and deleted at the
next start. A resume fetches only what its rank reads: the files of its own rank and those of none.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvmae.weights import write_text_atomically
from train.rundir import RunDir

LATEST = "latest"
META = "meta.json"
BEST = "best.json"
_STEP = re.compile(r"^step-(\d{8})$")
# Whose file it is, by name: DeepSpeed's per-rank files ((bf16_)zero_pp_rank_R_..., ZeRO shards and optimizer
# partitions) and ours (rank-RRRRR.json). Files without a rank (meta.json, config.yaml, below ZeRO-3
# mp_rank_00_model_states.pt) are written by rank 0 and read by every rank.
_OWNER = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rank-(\d{5})\.json$")
STALL_ENV = "LVMAE_TEST_STALL_UPLOAD"  # tests only: "N" halts every rank after its first upload of step N


class CheckpointError(Exception):
    """A checkpoint cannot be used (missing, incomplete, from another world size): a user error."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def file_owner(name: str) -> int | None:
    """The rank a checkpoint file belongs to (by its name), or None for the files of no rank."""
    m = _OWNER.search(name)
    return None if m is None else int(m.group(1) or m.group(2))


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
        self.location = str(self.dir)  # where the checkpoints live, for messages
        self.upload_seconds = 0.0  # of the last save (only a run on object storage uploads)
        self.best: dict[str, Any] | None = None  # best.json: never pruned (run.keep_best)
        self.meta_extra: dict[str, Any] = {}  # more of meta.json: the batch plan (train.elastic)

    def where(self, path: Path) -> str:
        """A checkpoint's address for messages: here its path."""
        return str(path)

    def named(self, resume: str) -> Path:
        """--resume PATH: the checkpoint folder it names."""
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        return path

    def fetch(self, path: Path, every_rank: bool = False) -> None:
        """Make checkpoint `path` readable here (a local one is)."""

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

    def save(
        self,
        engine: Any,
        step: int,
        rank_state: dict[str, Any],
        config_yaml: str,
        run_files: Sequence[str] = (),
    ) -> Path:
        """Collective (every rank calls it). -> the new checkpoint's folder. `run_files` (paths relative to
        the run folder, e.g. the log) matter only to StoredCheckpoints, which uploads them with the save."""
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
            meta = {"step": step, "world_size": self.world_size, "time": time.time(), **self.meta_extra}
            write_text_atomically(tmp / META, json.dumps(meta, indent=1) + "\n")
            if final.exists():  # a checkpoint of this step from an earlier attempt: the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomically(self.dir / LATEST, name + "\n")
            self._prune()
        _barrier(dist)  # nobody goes on (or reads `latest`) before the rename
        return final

    def read_best(self) -> dict[str, Any] | None:
        """best.json, or None."""
        path = self.dir / BEST
        return json.loads(path.read_text()) if path.is_file() else None

    def _write_best(self, text: str) -> None:
        write_text_atomically(self.dir / BEST, text)

    def set_best(self, best: dict[str, Any]) -> None:
        """After the save of best["step"]: remember it, so pruning spares it; rank 0 writes best.json and
        prunes the best it replaces."""
        self.best = best
        if self.rank == 0:
            self._write_best(json.dumps(best, indent=1) + "\n")
            self._prune()

    def _prunable(self) -> list[int]:
        """Steps beyond the last keep_last, the best one spared."""
        if self.keep_last <= 0:
            return []
        best = self.best["step"] if self.best else None
        return [s for s in self.steps()[: -self.keep_last] if s != best]

    def _prune(self) -> None:
        for step in self._prunable():
            shutil.rmtree(self.dir / step_name(step), ignore_errors=True)

    def load(self, engine: Any, path: Path) -> tuple[int, dict[str, Any]]:
        """Collective. Restore the engine (parameters, optimizer, the lr schedule's step; its rates stay
        this run's, train.engine.follow_schedule) and this process's RNG states from checkpoint `path`;
        -> (its step, this rank's saved state, e.g. the loader's)."""
        meta_path = path / META
        if not meta_path.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {META})")
        meta = json.loads(meta_path.read_text())
        if meta["world_size"] != self.world_size:  # train.elastic.load_resized reads those
            raise CheckpointError(
                f"{path} was saved by {meta['world_size']} ranks, this run has {self.world_size}"
            )
        rank_file = path / f"rank-{self.rank:05d}.json"
        if not rank_file.is_file():
            raise CheckpointError(f"{path} has no state for rank {self.rank} ({rank_file.name})")
        from train.engine import follow_schedule

        base_lrs = list(engine.lr_scheduler.base_lrs)  # this run's rates: its config at its world size
        load_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        follow_schedule(engine.lr_scheduler, base_lrs)  # the step comes from the checkpoint, the rates do not
        state = json.loads(rank_file.read_text())
        set_rng_state(state.pop("rng"))
        return int(meta["step"]), state


class StoredCheckpoints(Checkpoints):
    """RUN/checkpoints of a run on object storage, seen from one rank: the store holds the checkpoints,
    `dir` (STAGE/checkpoints) this node's local copies (see the module docstring for the commit order)."""

    def __init__(self, run: RunDir, rank: int, world_size: int, keep_last: int):
        if run.store is None:
            raise ValueError("StoredCheckpoints needs a run on object storage")
        super().__init__(run.local / "checkpoints", rank, world_size, keep_last)
        self.run, self.store = run, run.store
        self.location = run.uri("checkpoints")

    def where(self, path: Path) -> str:
        return self.run.where(path)

    def _complete(self, name: str) -> bool:
        return self.run.exists(f"checkpoints/{name}/{META}")

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on the store (those with meta.json), oldest first."""
        store, pattern = self.store, self.store.path(f"checkpoints/step-*/{META}")
        store.fs.invalidate_cache()
        found = store.call(lambda: store.fs.glob(pattern), f"listing {self.location}")
        names = (_STEP.match(str(p).rstrip("/").split("/")[-2]) for p in found)
        return sorted(int(m.group(1)) for m in names if m)

    def latest(self) -> Path | None:
        """The newest complete checkpoint on the store (as `latest` names it, else the newest with its
        meta.json), as the local folder it is fetched into."""
        try:
            name = self.store.read_bytes(f"checkpoints/{LATEST}").decode().strip()
        except FileNotFoundError:
            name = ""
        except Exception as err:  # the run's first touch of the store: say what to check, in one line
            raise CheckpointError(
                f"cannot read {self.location} ({type(err).__name__}: {err}): check the endpoint "
                "(AWS_ENDPOINT_URL) and the keys (AWS_ACCESS_KEY_ID... or ~/.aws)"
            ) from None
        if name and self._complete(name):
            return self.dir / name
        steps = self.steps()
        return self.dir / step_name(steps[-1]) if steps else None

    def named(self, resume: str) -> Path:
        """--resume URL: one of this run's checkpoints on the store (RUN/checkpoints/step-N)."""
        prefix = self.location + "/"
        name = resume.rstrip("/")[len(prefix) :] if resume.startswith(prefix) else ""
        if not _STEP.match(name) or not self._complete(name):
            raise CheckpointError(
                f"--resume {resume}: not a complete checkpoint of this run (give {prefix}step-N, or auto)"
            )
        return self.dir / name

    def remove_stale(self) -> list[str]:
        """Rank 0, before training: delete the uploads a killed run never committed (step-N/ without
        meta.json, .tmp-*) from the store, and unfinished local writes (.tmp-*) from the stage."""
        names = self.run.list("checkpoints")
        stale = [n for n in names if n.startswith(".tmp-") or (_STEP.match(n) and not self._complete(n))]
        for name in stale:
            self.run.remove(f"checkpoints/{name}")
        local = super().remove_stale()
        return sorted(set(stale) | set(local))

    def _remove_step(self, name: str) -> None:
        """Delete one step on the store, meta.json first: a kill half way leaves no complete-looking rest."""
        self.run.remove(f"checkpoints/{name}/{META}")
        self.run.remove(f"checkpoints/{name}")

    def save(
        self,
        engine: Any,
        step: int,
        rank_state: dict[str, Any],
        config_yaml: str,
        run_files: Sequence[str] = (),
    ) -> Path:
        """Collective. Save into the stage, upload, commit (meta.json, then `latest`), prune; -> the local
        copy's folder. `upload_seconds`: rank 0, from the first upload to `latest`; other ranks, their
        own files."""
        import torch.distributed as dist

        name = step_name(step)
        local = self.dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in local.iterdir() if local.is_dir() else ():  # a local copy of an earlier attempt
            if old.is_file() and self._owns(old.name):
                old.unlink(missing_ok=True)
        engine.save_checkpoint(str(self.dir), tag=name, save_latest=False)
        state = {**rank_state, "rng": rng_state()}
        write_text_atomically(local / f"rank-{self.rank:05d}.json", json.dumps(state))
        if self.rank == 0:
            write_text_atomically(local / "config.yaml", config_yaml)
            meta = {"step": step, "world_size": self.world_size, "time": time.time(), **self.meta_extra}
            write_text_atomically(local / META, json.dumps(meta, indent=1) + "\n")
            self._remove_step(name)  # an earlier attempt at this step (complete or not): the new one wins
        _barrier(dist)

        started = time.perf_counter()
        mine = [p.name for p in sorted(local.iterdir()) if p.is_file() and self._uploads(p.name)]
        stall = os.environ.get(STALL_ENV) == str(step)
        for i, file in enumerate(mine):
            self.run.upload(f"checkpoints/{name}/{file}")
            if stall and i == 0:
                time.sleep(3600)  # a test kills the run here, with step-N half uploaded
        self.upload_seconds = time.perf_counter() - started
        _barrier(dist)  # every rank's part is on the store

        if self.rank == 0:
            for rel in run_files:
                if (self.run.local / rel).is_file():
                    self.run.upload(rel)
            self.run.upload(f"checkpoints/{name}/config.yaml")
            self.run.upload(f"checkpoints/{name}/{META}")  # the commit
            self.store.write_bytes(f"checkpoints/{LATEST}", (name + "\n").encode())
            self.upload_seconds = time.perf_counter() - started
            self._prune()
        self._prune_local()
        _barrier(dist)  # nobody goes on (or reads `latest`) before the commit
        return local

    def _owns(self, file: str) -> bool:
        """Whether this rank writes `file` of a checkpoint: its own files; rank 0 also those of no rank."""
        owner = file_owner(file)
        return owner == self.rank or (owner is None and self.rank == 0)

    def _uploads(self, file: str) -> bool:
        """Whether this rank uploads `file` of a checkpoint it saved (rank 0 commits config and meta last)."""
        if file in (META, "config.yaml") or file.startswith(".") or ".tmp-" in file:  # or a half write
            return False
        return self._owns(file)

    def read_best(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(f"checkpoints/{BEST}"))
        except FileNotFoundError:
            return None

    def _write_best(self, text: str) -> None:
        self.store.write_bytes(f"checkpoints/{BEST}", text.encode())

    def _prune(self) -> None:
        for step in self._prunable():
            self._remove_step(step_name(step))

    def _prune_local(self) -> None:
        """Keep this node's newest `keep_last` local copies (the store decides what is a checkpoint)."""
        if self.keep_last <= 0 or not self.dir.is_dir():
            return
        local = sorted(p for p in self.dir.iterdir() if _STEP.match(p.name) and p.is_dir())
        for p in local[: -self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)

    def fetch(self, path: Path, every_rank: bool = False) -> None:
        """Download checkpoint `path.name` from the store into the stage: this rank's files and those of no
        rank, or (every_rank) all of them."""
        files = self.run.list(f"checkpoints/{path.name}")
        if META not in files:
            raise CheckpointError(f"{self.where(path)} is not a complete checkpoint (no {META})")
        for file in files:
            if every_rank or file_owner(file) in (None, self.rank):
                self.run.download(f"checkpoints/{path.name}/{file}")

    def load(self, engine: Any, path: Path) -> tuple[int, dict[str, Any]]:
        """Collective. Fetch what this rank reads of checkpoint `path.name`, then restore from it as
        Checkpoints.load does."""
        self.fetch(path)
        return super().load(engine, path)


def open_checkpoints(run: RunDir, rank: int, world_size: int, keep_last: int) -> Checkpoints:
    """The checkpoints of run folder `run`: on its store (StoredCheckpoints) or in its local folder."""
    if run.remote:
        return StoredCheckpoints(run, rank, world_size, keep_last)
    return Checkpoints(run.local / "checkpoints", rank, world_size, keep_last)


def _barrier(dist: Any) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
