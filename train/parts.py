"""The pieces one rank of a training run is built from, beside the model: its loader (and the settings the
health probe's loaders share) and its metrics exporter. train.trainer assembles them."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from lvmae.errors import UserError
from train.decoders import ships_uint8
from train.dist import Dist
from train.loader import ClipLoader
from train.metrics import TrainMetrics, write_targets
from train.rundir import RunDir
from train.tasks import Task


def loader_kwargs(cfg: Any, dist: Dist, device: torch.device | None = None) -> dict[str, Any]:
    """The ClipLoader settings every loader of this rank shares (the training one and the health probe's).
    device: where the steps run; with the PyAV decoder on CUDA, batches come as uint8 and are converted
    there (train.decoders.ships_uint8, video_to)."""
    threads = cfg.data.decode_threads or max(1, (os.cpu_count() or 1) // dist.local_world_size)
    uint8 = device is not None and ships_uint8(cfg.data.decoder, device)
    return {
        "decoder": cfg.data.decoder,
        "storage_options": cfg.data.storage_options or None,  # None: endpoint from the environment
        "retries": cfg.data.retries,
        "retry_deadline": cfg.data.retry_deadline_s,
        "decoder_kwargs": {"num_threads": threads, "device_id": dist.local_rank}
        | ({"uint8": True} if uint8 else {}),
    }


def build_loader(cfg: Any, task: Task, dist: Dist, device: torch.device | None = None) -> ClipLoader:
    """This rank's loader, checked against the task."""
    loader = ClipLoader(
        cfg.data.url,
        cfg.data.batch_size,
        seed=cfg.run.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        tokens=task.tokens,
        split=cfg.data.split,
        labels=task.labels,
        **loader_kwargs(cfg, dist, device),
    )
    attrs = dict(loader.tokens.group.attrs) if loader.tokens is not None else None
    task.check_data(loader.spec, attrs, cfg.data.url)
    task.set_classes(loader.classes, loader.label_counts)
    return loader


def build_metrics(cfg: Any, dist: Dist, run: RunDir | None = None) -> TrainMetrics:
    """This rank's exporter on port base + rank; local rank 0 writes the node's file-SD target list, beside
    the run folder (for a run on object storage: beside its local stage folder)."""
    metrics = TrainMetrics(rank=dist.rank)
    base, addr = cfg.run.metrics_port_base, cfg.run.metrics_addr
    if base == 0:
        return metrics
    try:
        metrics.serve(base + dist.rank, addr)
    except OSError as err:
        raise UserError(
            f"rank {dist.rank} cannot serve metrics on {addr}:{base + dist.rank} ({err}): set "
            "run.metrics_port_base to free ports (or 0 to turn metrics off)"
        ) from None
    if dist.local_rank == 0:
        run = run or RunDir(cfg.run.out)
        first = dist.node * dist.local_world_size
        ports = [base + first + i for i in range(dist.local_world_size)]
        host = socket.gethostname() if addr in ("0.0.0.0", "::") else addr
        name = run.name if dist.world_size == dist.local_world_size else f"{run.name}-node{dist.node}"
        write_targets(run.local.parent, run.name, ports, host, first_rank=first, name=name)
    return metrics
