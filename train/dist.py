"""This process's place in a training run: rank, world size, node, and the process group it joins.

dist = join_process_group()     # from the launcher's env (torchrun, deepspeed); alone: rank 0 of 1
dist.rank, dist.world_size, dist.local_rank, dist.node
every_rank_has(tdist, ok, device)   # one small all-reduce: do all ranks agree to go on?
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def node(self) -> int:
        return self.rank // self.local_world_size


def free_port(pair: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (with pair=True, one whose successor is free too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if not pair:
                return port
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def join_process_group() -> Dist:
    """Read RANK, WORLD_SIZE, LOCAL_RANK... (torchrun and the deepspeed launcher set them; a process started
    alone is rank 0 of 1) and join the process group."""
    from train.engine import init_distributed  # here: free_port's users (the demo) need no DeepSpeed

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    world = int(os.environ["WORLD_SIZE"])
    dist = Dist(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if "LVMAE_LAUNCHED" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_parent()
    if MARKS_ENV in os.environ:
        mark_exit(Path(os.environ[MARKS_ENV]), dist.rank)
    # DeepSpeed's ZeRO-3 calls a torch collective that torch 2.13 deprecates, once per step: not ours to fix.
    warnings.filterwarnings(
        "ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning
    )
    init_distributed()
    return dist


# Set by `lvmae launch`: a folder where each rank marks that it exited (lvmae_cli.rank_watch names a rank
# gone without its mark as lost).
MARKS_ENV = "LVMAE_RANK_EXITS"


def mark_exit(folder: Path, rank: int) -> None:
    """Mark this rank's exit in `folder` when the interpreter exits (every exit but a kill)."""
    atexit.register(lambda: (folder / f"rank-{rank}").touch())


def exit_with_parent(interval: float = 1.0) -> None:
    """End this rank when its launcher dies. torchrun starts ranks in sessions of their own, so a killed
    launcher would leave them training, and writing checkpoints, beside the run that resumes them."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                print(
                    f"rank {os.environ.get('RANK')}: the launcher (pid {parent}) died; stopping", flush=True
                )
                os._exit(1)

    threading.Thread(target=watch, name="lvmae-parent-watch", daemon=True).start()


def every_rank_has(tdist: Any, ok: bool, device: torch.device) -> bool:
    """True when every rank has `ok` (one small all-reduce): a rank whose loader gave up makes every rank
    stop together, between steps, instead of leaving the others blocked in the step's collectives."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
    return bool(flag.item())
