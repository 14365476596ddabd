"""A Slurm job step's tasks as the ranks of a run: what `lvmae launch --launcher slurm` gives each task.

    srun lvmae launch --launcher slurm -- train mae RECIPE...   # in an allocation: one task per GPU
    env = rank_env(os.environ)   # RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_*

`srun` starts the tasks; each task becomes one rank (train.dist reads the variables this writes). The
master is the first host of the step's node list, where rank 0 runs, expanded by `scontrol show
hostnames`; its port is derived from the job and step ids, so every task agrees without talking.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping

from lvmae.errors import UserError

# Master ports come from [PORT_BASE, PORT_BASE + 10,000): below Linux's ephemeral range (32768-60999),
# so no outgoing connection holds one by chance.
PORT_BASE = 20000


def master_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of a job step: the same in every task; 10 steps of one job running at once,
    and jobs whose ids differ in their last three digits, never collide."""
    return PORT_BASE + (job_id % 1000) * 10 + step_id % 10


def tasks_on_node(spec: str, node: int) -> int:
    """Slurm's compressed tasks-per-node list (SLURM_STEP_TASKS_PER_NODE: "4(x2),2" is 4, 4, 2) at `node`."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise UserError(f"cannot read Slurm's tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node < len(counts):
        raise UserError(f"Slurm's tasks per node {spec!r} has no node {node}")
    return counts[node]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu-[03-05,9]" -> "gpu-03"), expanded by Slurm itself."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise UserError("--launcher slurm needs Slurm's scontrol on PATH (to expand the node list)")
    run = subprocess.run(
        [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60
    )
    hosts = run.stdout.split()
    if run.returncode != 0 or not hosts:
        why = (run.stderr.strip().splitlines() or ["no host"])[-1]
        raise UserError(f"scontrol show hostnames {nodelist!r} failed: {why}")
    return hosts[0]


def rank_env(
    environ: Mapping[str, str],
    *,
    master_addr: str | None = None,
    port: int | None = None,
    hostnames: Callable[[str], str] = first_host,
) -> dict[str, str]:
    """The rank variables of this Slurm task, from Slurm's (a pure function of `environ`, but for the
    node-list expansion `hostnames`). One clear error outside an allocation, or outside a job step."""
    if "SLURM_JOB_ID" not in environ:
        raise UserError(
            "--launcher slurm runs inside a Slurm allocation, and there is none here (no SLURM_JOB_ID): "
            "submit ops/slurm/pretrain.sbatch with sbatch, or use --launcher deepspeed|torchrun"
        )
    if "SLURM_STEP_ID" not in environ or "SLURM_PROCID" not in environ:
        raise UserError(
            "--launcher slurm starts one rank per Slurm task: run it under srun "
            "(srun lvmae launch --launcher slurm -- train ...), not in the batch script itself"
        )
    node = int(environ.get("SLURM_NODEID", "0"))
    world = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or world
    local_world = tasks_on_node(per_node, node)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    env = {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": world,
        "LOCAL_WORLD_SIZE": str(local_world),
        "NODE_RANK": str(node),
        "MASTER_ADDR": master_addr or hostnames(nodelist),
        "MASTER_PORT": str(port or master_port(int(environ["SLURM_JOB_ID"]), int(environ["SLURM_STEP_ID"]))),
    }
    # Each rank drives GPU LOCAL_RANK of those it sees: a task bound to one GPU (--gpus-per-task,
    # --gpu-bind) would drive one that is not its own, or none.
    gpus = [g for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if gpus and len(gpus) < local_world:
        raise UserError(
            f"this task sees {len(gpus)} GPU(s) (CUDA_VISIBLE_DEVICES={','.join(gpus)}) for "
            f"{local_world} ranks on its node: allocate with --gpus-per-node, not --gpus-per-task or "
            "--gpu-bind (each rank picks GPU LOCAL_RANK among its node's)"
        )
    if "OMP_NUM_THREADS" not in environ:  # the node's allocated CPUs, shared by its ranks
        cpus = environ.get("SLURM_CPUS_PER_TASK")
        if not cpus:
            on_node = int(environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
            cpus = str(max(1, on_node // local_world))
        env["OMP_NUM_THREADS"] = cpus
    return env
