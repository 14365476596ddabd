"""Preemption: a signal asks a run to stop after the step it is in, with a checkpoint on the way out.

Schedulers send a signal a grace period before they kill a job (Slurm: SIGTERM on preemption and at the
time limit, or what `#SBATCH --signal` names ahead of it). Each rank's handler only notes the signal
(run.preempt_signals); after every step the ranks agree, with one all-reduce of one number, whether any of
them got one, so they all stop at the same step, write a checkpoint together, and exit with
REQUEUE_EXIT: ops/slurm/pretrain.sbatch turns that status into a requeue, and the job's next start
resumes from the checkpoint (`--resume auto`) as if it had never stopped.

    preemption = Preemption(["SIGTERM", "SIGUSR1"])
    ...after each step:  if preemption.agreed(tdist, device): save, then raise Preempted(...)
"""

from __future__ import annotations

import signal
import time
from typing import Any

import torch

from lvmae.errors import UserError
from train.dist import every_rank_has

# EX_TEMPFAIL (sysexits.h): "try again later". What `lvmae train` exits with after a preemption.
REQUEUE_EXIT = 75


class Preempted(UserError):
    """The run stopped at a step boundary on a preemption signal, with a checkpoint of that step."""

    exit_code = REQUEUE_EXIT


class Preemption:
    """Notes the first of `signals` (names: SIGTERM, SIGUSR1, ...) this process receives; restore() puts
    back the handlers there were. Install from the main thread (Python delivers signals there)."""

    def __init__(self, signals: list[str]):
        self.signal: str | None = None  # the name of the first signal received
        self.received_at: float | None = None  # time.monotonic() then
        self._previous: dict[int, Any] = {}
        for name in signals:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal, self.received_at = signal.Signals(signum).name, time.monotonic()

    def agreed(self, tdist: Any, device: torch.device) -> bool:
        """Collective (every rank, between steps): True when any rank has received a signal."""
        return not every_rank_has(tdist, self.signal is None, device)

    def waited(self) -> float:
        """Seconds since this rank's signal (0 when the signal reached another rank only)."""
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


def preempted_message(sig: str | None, step: int, where: str, waited: float, grace: float) -> str:
    """The one line a preempted run ends with (each rank says it)."""
    why = f"on {sig}" if sig else "on a signal to another rank"
    late = (
        f"; that is past run.preempt_grace_s={grace:g}: the scheduler may kill a run before it saves, so send "
        "the signal earlier (#SBATCH --signal) or raise the grace"
        if waited > grace
        else ""
    )
    return (
        f"preempted {why}: stopped after step {step}, checkpoint {where} saved {waited:.1f} s after the "
        f"signal{late}; exit {REQUEUE_EXIT} asks for a requeue, and `--resume auto` continues from it"
    )
