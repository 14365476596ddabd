"""Training metrics through one small interface; Prometheus is its exporter.

Each rank serves its own registry on port_base + rank (127.0.0.1 unless configured) and the run writes a
Prometheus file-SD target list naming every rank, so ops/prometheus.yml finds them. Names follow
Prometheus conventions: the `lvmae_` prefix, `_total` counters, units in the name.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

TARGETS_DIR = "prometheus-targets"  # under the runs folder: ops/prometheus.yml reads TARGETS_DIR/*.json


def peak_memory_bytes() -> tuple[str, int]:
    """("cuda", peak allocated bytes) when CUDA is in use, else ("rss", the process's peak RSS)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return "cuda", int(torch.cuda.max_memory_allocated())
    except ImportError:  # metrics also serve processes without torch
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "rss", int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


class TrainMetrics:
    """Figures of one rank. Call `step(...)` once per optimizer step and `loader(...)` with loader stats."""

    def __init__(self, rank: int = 0, registry: CollectorRegistry | None = None):
        self.rank = rank
        r = self.registry = registry or CollectorRegistry()
        self.steps = Counter("lvmae_train_steps", "Optimizer steps taken", registry=r)
        self.samples = Counter("lvmae_train_samples", "Clips trained on", registry=r)
        self.tokens = Counter("lvmae_train_tokens", "Tokens in the clips trained on", registry=r)
        self.step_seconds = Counter("lvmae_train_step_seconds", "Wall time in training steps", registry=r)
        self.wait_seconds = Counter(
            "lvmae_train_data_wait_seconds", "Step time spent waiting for data", registry=r
        )
        self.compute_seconds = Counter("lvmae_train_compute_seconds", "Step time spent computing", registry=r)
        self.nonfinite = Counter(
            "lvmae_train_nonfinite_loss", "Steps whose loss was NaN or infinite", registry=r
        )
        self.loss = Gauge("lvmae_train_loss", "Loss of the last step", registry=r)
        self.lr = Gauge("lvmae_train_learning_rate", "Learning rate of the last step", registry=r)
        self.grad_norm = Gauge("lvmae_train_grad_norm", "Gradient norm of the last step", registry=r)
        self.accuracy = Gauge(
            "lvmae_train_accuracy_ratio",
            "Share of the last step's clips classified right (fine-tuning)",
            registry=r,
        )
        self.last_step = Gauge(
            "lvmae_train_last_step_timestamp_seconds", "Unix time of the last step", registry=r
        )
        self.peak_memory = Gauge(
            "lvmae_train_peak_memory_bytes", "Peak memory (CUDA or RSS)", ["kind"], registry=r
        )
        self.queue_depth = Gauge(
            "lvmae_loader_queue_depth", "Samples read ahead and waiting in the loader's queue", registry=r
        )
        self.frames = Counter("lvmae_loader_decoded_frames", "Frames decoded by the loader", registry=r)
        self.read_bytes = Counter("lvmae_loader_read_bytes", "Bytes read from the store", registry=r)
        self.retries = Counter("lvmae_loader_retries", "Store reads retried", registry=r)
        self.stalled = Gauge(
            "lvmae_loader_store_stalled_seconds",
            "Seconds the loader has been waiting for the store to answer (0 while reads succeed)",
            registry=r,
        )
        self.errors = Counter("lvmae_loader_errors", "Store reads that failed after retries", registry=r)
        self.skipped = Counter(
            "lvmae_loader_skipped_samples", "Corrupt or invalid samples skipped", registry=r
        )
        self.checkpoint_upload = Gauge(
            "lvmae_checkpoint_upload_seconds",
            "Upload time of the last checkpoint to object storage (rank 0: the whole commit; 0 locally)",
            registry=r,
        )
        # The in-run health probe (train.health), on rank 0 only: no series before its first eval.
        self.eval_knn = Gauge(
            "lvmae_eval_knn_top1_ratio", "k-NN probe top-1 on the held-out split", ["split"], registry=r
        )
        self.eval_spread = Gauge(
            "lvmae_eval_feature_spread_ratio",
            "Std of the L2-normalised pooled features across clips, x sqrt(dim): 0 is collapse",
            ["split"],
            registry=r,
        )
        self.eval_rank = Gauge(
            "lvmae_eval_effective_rank", "Effective rank of the pooled features", ["split"], registry=r
        )
        self._loader_seen: dict[str, float] = {}

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def step(
        self,
        *,
        samples: int,
        tokens: int,
        data_wait_s: float,
        compute_s: float,
        loss: float,
        lr: float,
        grad_norm: float | None = None,
        accuracy: float | None = None,
    ) -> None:
        self.steps.inc()
        self.samples.inc(samples)
        self.tokens.inc(tokens)
        self.wait_seconds.inc(data_wait_s)
        self.compute_seconds.inc(compute_s)
        self.step_seconds.inc(data_wait_s + compute_s)
        if loss != loss or loss in (float("inf"), float("-inf")):
            self.nonfinite.inc()
        self.loss.set(loss)
        self.lr.set(lr)
        if grad_norm is not None:
            self.grad_norm.set(grad_norm)
        if accuracy is not None:
            self.accuracy.set(accuracy)
        self.last_step.set(time.time())
        kind, peak = peak_memory_bytes()
        self.peak_memory.labels(kind).set(peak)

    def eval(self, record: dict[str, Any]) -> None:
        """The figures of one in-run evaluation (train.health.HealthProbe.evaluate)."""
        split = record["split"]
        self.eval_knn.labels(split).set(record["knn_top1"])
        self.eval_spread.labels(split).set(record["feature_spread"])
        self.eval_rank.labels(split).set(record["effective_rank"])

    def checkpoint(self, *, upload_s: float) -> None:
        self.checkpoint_upload.set(upload_s)

    def watch_store(self, retry: Any) -> None:
        """Live figures of an ingest.retry.StoreRetry: the stall gauge is read at each scrape, and every
        retry counts at once, also while the training loop itself is blocked waiting for data."""
        self.stalled.set_function(retry.stalled_seconds)
        retry.on_retry.append(self.retries.inc)

    def loader(
        self,
        *,
        queue_depth: int | None = None,
        frames: int = 0,
        read_bytes: int = 0,
        retries: int = 0,
        errors: int = 0,
        skipped: int = 0,
    ) -> None:
        """Cumulative loader figures (as the loader's stats hold them): only the increase is added."""
        if queue_depth is not None:
            self.queue_depth.set(queue_depth)
        for name, total, counter in (
            ("frames", frames, self.frames),
            ("read_bytes", read_bytes, self.read_bytes),
            ("retries", retries, self.retries),
            ("errors", errors, self.errors),
            ("skipped", skipped, self.skipped),
        ):
            delta = total - self._loader_seen.get(name, 0)
            if delta > 0:
                counter.inc(delta)
                self._loader_seen[name] = total


def write_targets(
    runs_dir: str | os.PathLike[str],
    run: str,
    ports: list[int],
    host: str = "127.0.0.1",
    first_rank: int = 0,
    name: str | None = None,
) -> Path:
    """RUNS/prometheus-targets/NAME.json (NAME defaults to RUN), a file-SD target list: one target per
    rank (ranks first_rank, first_rank + 1, ... on `host`), labelled with run and rank. Prometheus globs
    only the last path component, hence one folder for all runs; on several nodes each node writes its own
    file (NAME = RUN-nodeK) naming its ranks."""
    entries = [
        {"targets": [f"{host}:{port}"], "labels": {"run": run, "rank": str(first_rank + i)}}
        for i, port in enumerate(ports)
    ]
    path = Path(runs_dir) / TARGETS_DIR / f"{name or run}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from lvmae.weights import write_text_atomically  # here: the metrics themselves need no torch

    # Prometheus re-reads the file on change: never let it see half of one.
    write_text_atomically(path, json.dumps(entries, indent=1) + "\n")
    return path
