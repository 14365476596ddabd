"""`lvmae launch`: start a training run's ranks (`lvmae train ...` in each) with DeepSpeed's launcher or
torchrun, on this machine or on the hosts of a hostfile; or, under Slurm, become one rank per task.

    lvmae launch --nproc 2 -- train mae configs/demo_cpu.yaml data.tokens=fsq-...  # 2 ranks, deepspeed
    lvmae launch --hostfile ops/hostfile.example -- train mae configs/vitb_128f.yaml data.url=s3://...
    lvmae launch --launcher torchrun --nproc 2 -- finetune configs/finetune_demo_cpu.yaml ...
    srun lvmae launch --launcher slurm -- train mae configs/vitb_128f.yaml ...  # ops/slurm/pretrain.sbatch

The rank command is parsed and its config checked here, once, rather than failing in every rank.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lvmae.errors import UserError
from lvmae_cli.rank_watch import MARKS_ENV, RankWatch, rank_pids
from lvmae_cli.train_cmd import add_train_parser, load_task

# What starts the ranks: deepspeed and torchrun start them from here; under slurm, srun has started one
# `lvmae launch` per task and each becomes a rank (train.slurm maps Slurm's variables to the rank's).
LAUNCHERS = ("deepspeed", "torchrun", "slurm")
NO_DEEPSPEED = (
    "DeepSpeed and its launcher are not installed (pip install deepspeed), or use --launcher torchrun"
)


def launcher_command(
    launcher: str,
    nproc: int | None,
    rest: list[str],
    *,
    hostfile: str | None = None,
    num_nodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int = 29500,
) -> list[str]:
    """The command that starts `lvmae REST...` on nproc processes per node (a pure function). With a
    hostfile and nproc None, each node runs as many processes as its `slots`. Under Slurm, srun has
    started the processes already: the command is the rank itself."""
    if launcher == "slurm":
        return [sys.executable, "-m", "lvmae_cli", *rest]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc or 1}"]
        cmd += [f"--nnodes={num_nodes or 1}", f"--master_port={master_port}"]
        if (num_nodes or 1) > 1:
            cmd += [f"--node_rank={node_rank or 0}"]
        cmd += [f"--master_addr={master_addr or '127.0.0.1'}"]
        return [*cmd, "-m", "lvmae_cli", *rest]
    if not hostfile:
        # This machine only: DeepSpeed's per-node launcher (deepspeed.launcher.launch) started directly, with
        # the arguments its runner would give it for --num_gpus N, --master_addr 127.0.0.1 (ranks 0..N-1 on
        # `localhost`, their CUDA_VISIBLE_DEVICES set by it). The runner would only add a Python start-up
        # that imports DeepSpeed (about 3 s here) before doing the same.
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(NO_DEEPSPEED)
        world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc or 1))}).encode()).decode()
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}"]
        cmd += [f"--master_addr={master_addr or '127.0.0.1'}", f"--master_port={master_port}"]
        return [*cmd, "--module", "--no_local_rank", "--log_level=info", "lvmae_cli", *rest]
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    deepspeed = shutil.which("deepspeed", path=search)
    if deepspeed is None:
        raise UserError(NO_DEEPSPEED)
    cmd = [deepspeed]
    if nproc is not None:
        cmd += [f"--num_gpus={nproc}"]
    cmd += [f"--master_port={master_port}", f"--hostfile={hostfile}"]
    if num_nodes:
        cmd += [f"--num_nodes={num_nodes}"]
    if master_addr:
        cmd += [f"--master_addr={master_addr}"]
    return [*cmd, "--no_local_rank", "--module", "lvmae_cli", *rest]


def rank_parser() -> argparse.ArgumentParser:
    """The parser of what each rank runs (`lvmae train ...`), to check it once here."""
    parser = argparse.ArgumentParser(prog="lvmae")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def cmd_launch(args: argparse.Namespace) -> int:
    rest = args.rest[1:] if args.rest[:1] == ["--"] else list(args.rest)
    if rest[:1] == ["finetune"]:
        rest = ["train", *rest]
    if rest[:1] != ["train"]:
        raise UserError(
            "usage: lvmae launch [options] -- train mae|tokenizer|finetune RECIPE... [key=value...]"
        )
    # Parse and check the rank command here, once, rather than fail in every rank.
    parsed = rank_parser().parse_args(rest)
    if args.launcher == "slurm":  # each task is a rank, which checks its config itself
        return exec_slurm_task(args, rest)
    load_task(parsed.kind, parsed.config)
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if args.hostfile and not Path(args.hostfile).is_file():
        raise UserError(f"no hostfile {args.hostfile}")
    cmd = launcher_command(
        args.launcher,
        args.nproc,
        rest,
        hostfile=args.hostfile,
        num_nodes=args.num_nodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=29500 if args.master_port is None else args.master_port,
    )
    env = {**os.environ, "LVMAE_LAUNCHED": "1"}  # ranks stop when their launcher dies
    if "OMP_NUM_THREADS" not in env and not args.hostfile:
        # The deepspeed launcher does not set it: ranks sharing the cores would oversubscribe them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (args.nproc or 1)))
    print("lvmae launch: " + " ".join(cmd), flush=True)
    # The launcher and its ranks stay in this process group: Ctrl-C in a terminal, or a kill of the group,
    # reaches every rank. A preemption signal sent to this process alone goes to the ranks themselves.
    marks = Path(tempfile.mkdtemp(prefix="lvmae-launch-"))  # ranks mark their exits here (rank_watch)
    proc = subprocess.Popen(cmd, env={**env, MARKS_ENV: str(marks)})
    watch = RankWatch(proc.pid, marks)  # a rank gone without exiting: named, and the others stopped
    watch.start()

    def preempt(signum: int, frame: object) -> None:
        watch.stop()  # the launcher stops the ranks left once one exits 75, not always cleanly
        forward_to_ranks(proc.pid, signum)

    for sig in PREEMPT_FORWARDED:
        signal.signal(sig, preempt)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the ranks got the SIGINT too: give them time to stop
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        watch.stop()
        shutil.rmtree(marks, ignore_errors=True)


# Signals this process passes to the ranks, which stop after their step with a checkpoint and exit 75
# (train.preempt; run.preempt_signals). Not to the launcher: DeepSpeed's and torchrun's kill their ranks
# 30 s after a SIGTERM and exit 1, which would lose the requeue status, and the checkpoint of a step that
# takes longer. With the ranks stopped, DeepSpeed's launcher exits with their 75 (torchrun reports any
# rank's non-zero exit as 1: under torchrun the checkpoint is written but the requeue status is lost).
PREEMPT_FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def forward_to_ranks(launcher_pid: int, signum: int) -> None:
    """Send `signum` to the ranks below the launcher (lvmae_cli.rank_watch.rank_pids)."""
    for pid in rank_pids(launcher_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def exec_slurm_task(args: argparse.Namespace, rest: list[str]) -> int:
    """Become this Slurm task's rank: its variables from Slurm's (train.slurm), then exec `lvmae REST...`
    in place, so that the signals Slurm sends the task (preemption, time limit) reach the rank itself."""
    from train.slurm import rank_env

    flags = {"--nproc": args.nproc, "--hostfile": args.hostfile, "--num-nodes": args.num_nodes}
    given = [flag for flag, value in {**flags, "--node-rank": args.node_rank}.items() if value is not None]
    if given:
        raise UserError(
            f"{', '.join(given)}: not with --launcher slurm, where the allocation sets the ranks "
            "(sbatch --nodes, --ntasks-per-node)"
        )
    env = {**os.environ, "LVMAE_LAUNCHED": "1"}  # a rank whose slurmstepd dies stops too
    env.update(rank_env(os.environ, master_addr=args.master_addr, port=args.master_port))
    cmd = launcher_command("slurm", None, rest)
    print(
        f"lvmae launch: rank {env['RANK']} of {env['WORLD_SIZE']} (local rank {env['LOCAL_RANK']}, "
        f"master {env['MASTER_ADDR']}:{env['MASTER_PORT']}): " + " ".join(cmd),
        flush=True,
    )
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
    return 0  # not reached: exec replaced this process


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "launch",
        help="start a training run's ranks with the deepspeed launcher, torchrun or Slurm",
        description="Start `lvmae train ...` on several processes: --nproc per node (GPUs, or CPU "
        "processes), on this machine or on the hosts of a DeepSpeed hostfile (see ops/hostfile.example). "
        "With --launcher slurm, run it under srun inside an allocation: each Slurm task becomes one rank "
        "(see ops/slurm/pretrain.sbatch).",
    )
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed")
    p.add_argument(
        "--nproc",
        type=int,
        help="processes per node (default 1; with --hostfile, the `slots` of each host)",
    )
    p.add_argument(
        "--hostfile", help="DeepSpeed hostfile (MPI style: `host slots=N` per line) for multi-node"
    )
    p.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile (torchrun: N nodes)")
    p.add_argument("--node-rank", type=int, help="torchrun on several nodes: this node's rank")
    p.add_argument("--master-addr", help="address of the first node (default 127.0.0.1 on one machine)")
    p.add_argument(
        "--master-port", type=int, help="default 29500; under Slurm, derived from the job and step ids"
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- train mae|tokenizer RECIPE... [key=value...]")
    p.set_defaults(func=cmd_launch)
