"""RUN/train_log.jsonl: one JSON line per optimizer step, written by rank 0.

log = TrainLog(run / LOG_FILE, enabled=rank == 0)
log.truncate(step)      # on resume: lines past the checkpoint's step are dropped
log.write({"step": 1, "loss": ...})
read_log(run / LOG_FILE)  # the records (a line cut short by a kill is skipped)
eval_records(records)   # the in-run probe's figures, each with its step

RUN/samples/rank-RRRRR.jsonl (run.sample_log): {"step", "epoch", "keys"} per step, each rank the keys of
the samples it trained on; a TrainLog per rank (`sample_log`), truncated on resume like the log (every
rank's file, also those of ranks a smaller run no longer has). read_samples(run) audits them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lvmae.weights import write_text_atomically

LOG_FILE = "train_log.jsonl"
SAMPLES_DIR = "samples"


class TrainLog:
    """RUN/train_log.jsonl: one JSON line per step (rank 0). On resume, lines past the checkpoint's step
    are dropped, so the log holds each step once, as an uninterrupted run would have written it."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self._file: Any = None

    def truncate(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in read_log(self.path) if line["step"] <= step]
        write_text_atomically(self.path, "".join(json.dumps(line) + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (open for the whole run)
        self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl (a line cut short by a kill is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def eval_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The health probe's figures in a log's records (train.health; step 0 has a line of its own), each
    with its step, in order."""
    return [{"step": r["step"], **r["eval"]} for r in records if "eval" in r]


def sample_log(run: Path, rank: int, enabled: bool) -> TrainLog:
    """This rank's sample log, RUN/samples/rank-RRRRR.jsonl (run.sample_log)."""
    if enabled:
        (run / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    return TrainLog(run / SAMPLES_DIR / f"rank-{rank:05d}.jsonl", enabled)


def truncate_samples(run: Path, step: int) -> None:
    """On resume (rank 0, before any rank writes): every rank's sample log loses the steps past `step`."""
    for path in sorted((run / SAMPLES_DIR).glob("rank-*.jsonl")):
        TrainLog(path, enabled=True).truncate(step)


def read_samples(run: str | os.PathLike[str]) -> dict[int, dict[int, dict[str, Any]]]:
    """RUN/samples -> {step: {rank: {"epoch", "keys"}}}: who trained on what, step by step."""
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for path in sorted((Path(run) / SAMPLES_DIR).glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for r in read_log(path):
            out.setdefault(r["step"], {})[rank] = {"epoch": r["epoch"], "keys": r["keys"]}
    return dict(sorted(out.items()))
