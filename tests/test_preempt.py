"""Preemption (train.preempt): a signal stops a run after its step, with a checkpoint, exit 75; the run
resumes from it with the losses of a run that was never stopped; a rank lost is named, the others stopped."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from train_data import finish, launch, losses, mae_args, wait_for_step

from lvmae.config import ConfigError
from lvmae_cli.rank_watch import rank_pids
from train.config import load_train_config
from train.preempt import REQUEUE_EXIT, Preemption


class OneRank:
    """torch.distributed's all-reduce in a group of one process: the value stays what it is."""

    ReduceOp = torch.distributed.ReduceOp

    @staticmethod
    def all_reduce(tensor: torch.Tensor, op: object = None) -> None:
        pass


def test_a_signal_is_noted_not_obeyed_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGUSR1)
    p = Preemption(["SIGUSR1"])
    assert not p.agreed(OneRank, "cpu")
    os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end this process
    assert p.signal == "SIGUSR1" and p.agreed(OneRank, "cpu") and p.waited() >= 0
    p.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("bad", ["SIGKILL", "SIGNOPE"])
def test_signals_that_cannot_be_caught_are_refused(bad):
    with pytest.raises(ConfigError, match=r"run\.preempt_signals"):
        load_train_config([], ["data.url=/x", f"run.preempt_signals=[{bad}]"])


@pytest.fixture(scope="module")
def data(train_data) -> tuple[Path, str]:
    return train_data


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_exits_75(data, uninterrupted: Path, tmp_path: Path):
    out = tmp_path / "preempted"
    proc = launch(mae_args(data, out))
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)  # to `lvmae launch` alone, as a scheduler signals a job step
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == REQUEUE_EXIT, text[-4000:]
    stopped = re.search(r"preempted on SIGTERM: stopped after step (\d+), checkpoint (\S+) saved", text)
    assert stopped, text[-4000:]
    step = int(stopped.group(1))
    assert 2 <= step < 12 and (out / "checkpoints" / f"step-{step:08d}" / "meta.json").is_file()
    assert max(s for s, _, _ in losses(out)) == step  # nothing logged past the checkpoint
    # What was logged is what the run never stopped logged; the resume from such a checkpoint gives the
    # rest of its losses exactly (tests/test_slurm.py, after a preemption; tests/test_train.py, a kill -9).
    assert losses(out) == losses(uninterrupted)[:step]


@pytest.mark.slow
def test_a_rank_killed_is_named_the_others_stop_and_the_survivors_go_on(data, uninterrupted, tmp_path: Path):
    """kill -9 of one rank, as a lost node would: `lvmae launch` names it and ends the other at once
    (blocked in a collective, it could neither go on nor save). `--resume auto --nproc 1` then goes on on
    what is left, from the last checkpoint (step 4), with the global batch kept (train.elastic)."""
    out = tmp_path / "lost"
    proc = launch(mae_args(data, out))
    wait_for_step(proc, out, 5)
    victim = next(pid for pid, rank in rank_pids(proc.pid).items() if rank == 1)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"rank 1 (pid {victim}) is gone without exiting" in text, text[-3000:]
    assert time.monotonic() - killed < 60  # the bound; a collective's timeout is many minutes
    assert "lvmae launch: rank 0" not in text  # the survivor is not reported as lost

    text = finish(launch([*mae_args(data, out), "--resume", "auto"], nproc=1))
    assert re.search(r"resumed from \S+step-00000004 at step 4", text), text[-3000:]
    assert "written by 2 ranks, this run has 1: global batch 4 kept as 2 clips x 2 accumulation" in text
    # steps 5-12 on one rank: the same samples and masks; sums in another order (the gradient norm's
    # partial sums): when written, steps 5-8 equal, then up to 2.4e-7 apart (tests/test_train_elastic.py)
    got, ref = losses(out), losses(uninterrupted)
    assert [(s, lr) for s, _, lr in got] == [(s, lr) for s, _, lr in ref]
    assert max(abs(a[1] - b[1]) for a, b in zip(got, ref)) < 1e-4
