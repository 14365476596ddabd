"""`lvmae launch`'s watch over the ranks its launcher started (Linux: /proc).

A rank that vanishes without exiting (kill -9, the out-of-memory killer, a lost node's processes) leaves
the others blocked in a collective until a timeout of many minutes. Each rank started by `lvmae launch`
leaves a mark in a folder of the launch's own as it exits (train.dist.mark_exit: any exit Python runs,
errors and preemption included); a rank gone without one was lost. The watch then names it in one line and
ends the others at once: they cannot finish a step, nor a checkpoint, without it.

    watch = RankWatch(launcher_pid, marks_dir); watch.start()   # a daemon thread
    rank_pids(launcher_pid)   # {pid: rank} of the ranks below a launcher
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from pathlib import Path

from train.dist import MARKS_ENV  # the folder where ranks mark their exits (train.dist.mark_exit)

__all__ = ["MARKS_ENV", "RankWatch", "rank_pids"]


def _children(pid: int) -> set[int]:
    """The child processes of `pid` (/proc lists them per thread; none when it is gone)."""
    found: set[int] = set()
    for thread in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found |= set(map(int, (thread / "children").read_text().split()))
    return found


def _module(cmdline: list[bytes]) -> bytes | None:
    """The module a `python ... -m MODULE ...` command line runs (the launchers' own command lines name
    lvmae_cli too, as their ranks' arguments)."""
    return cmdline[cmdline.index(b"-m") + 1] if b"-m" in cmdline[:-1] else None


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{pid: rank} of the topmost `python -m lvmae_cli` processes below a launcher (DeepSpeed's runner
    starts a per-node launcher, which starts the ranks; torchrun starts them itself)."""
    found, todo = {}, [launcher_pid]
    while todo:
        for pid in _children(todo.pop()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:  # gone
                continue
            if _module(cmdline) == b"lvmae_cli":
                ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=") and v[5:].isdigit()]
                found[pid] = ranks[0] if ranks else -1
            else:
                todo.append(pid)
    return found


class RankWatch(threading.Thread):
    """The ranks below the launcher, found every `interval` s and each watched through a pidfd, so that the
    watch wakes the moment one ends: one gone without its exit mark is lost. Waking at once matters: the
    launchers kill the other ranks soon after one dies (DeepSpeed's at its next poll, within a second), and
    a watch that only looked every so often would find them all gone and could not tell which went first.
    The watch ends when a rank exits on its own first (the end, an error: the launcher then stops the
    others, which is no loss), or on stop() (a preemption signal passed to the ranks: they may be stopped
    uncleanly once they have saved)."""

    def __init__(self, launcher_pid: int, marks: Path, interval: float = 0.2):
        super().__init__(name="lvmae-rank-watch", daemon=True)
        self.launcher_pid, self.marks, self.interval = launcher_pid, marks, interval
        self.lost: list[tuple[int, int]] = []  # (rank, pid) of each rank lost
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        watched: dict[int, tuple[int, int]] = {}  # pidfd -> (rank, pid)
        try:
            while not self._stop.is_set():
                pids = {pid for _, pid in watched.values()}
                gone: list[tuple[int, int]] = []
                for pid, rank in rank_pids(self.launcher_pid).items():
                    if pid not in pids:
                        try:
                            watched[os.pidfd_open(pid)] = (rank, pid)
                        except ProcessLookupError:  # ended between the listing and here
                            gone.append((rank, pid))
                ready = select.select(list(watched), [], [], self.interval)[0] if watched and not gone else []
                for fd in ready:
                    gone.append(watched.pop(fd))
                    os.close(fd)
                if gone and self._judge(gone, [pid for _, pid in watched.values()]):
                    return
                if not watched and not gone:
                    self._stop.wait(self.interval)
        finally:
            for fd in watched:
                os.close(fd)

    def _judge(self, gone: list[tuple[int, int]], others: list[int]) -> bool:
        """Ranks just ended: -> whether the watch is over (a clean exit among them, or a loss, reported and
        the others killed)."""
        lost = sorted((rank, pid) for rank, pid in gone if not (self.marks / f"rank-{rank}").exists())
        if len(lost) < len(gone):  # a rank exited on its own (done, an error): the launcher takes over
            return True
        self.lost = lost
        who = ", ".join(f"rank {rank} (pid {pid})" for rank, pid in lost)
        print(
            f"lvmae launch: {who} {'is' if len(lost) == 1 else 'are'} gone without exiting (killed, or its "
            f"node lost): stopping the other {len(others)} rank(s), which cannot go on without it; "
            "`--resume auto` continues from the last checkpoint",
            flush=True,
        )
        for other in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGKILL)
        return True
