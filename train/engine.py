"""The DeepSpeed engine and its config, built from a TrainConfig. The only module that imports deepspeed.

    init_distributed()                          # once per process, before anything distributed
    with model_init_context(cfg):               # ZeRO-3: parameters are partitioned as they are built
        model = MaskedVideoAutoencoder(cfg.model_config())
    engine, optimizer, scheduler = build_engine(model, cfg, world_size)
    loss = mae_loss(...); engine.backward(loss); engine.step()   # clip, AdamW step, lr schedule

The model knows nothing of parallelism; ZeRO stage, precision and clipping all come from
`deepspeed_config(cfg, world_size)`, and the peak learning rate from `effective_lr` (optim.lr, or scaled
with the global batch when optim.lr_reference_batch is set).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lvmae.config import check
from train.config import OptimConfig, TrainConfig, global_batch

# Parameters named like these are never weight-decayed (with biases and norm weights: anything 1-D).
NO_DECAY_NAMES = ("pos_embed", "mask_token", "cls_token")


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate before optimizer step `step` (0-based): linear warmup from 0 to cfg.lr at
    warmup_steps, then cosine decay to cfg.min_lr at total_steps, and min_lr after."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = cfg.total_steps - cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _lr_factor(step: int, cfg: OptimConfig) -> float:
    return lr_at(step, cfg) / cfg.lr


def effective_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The peak learning rate of a run of `global_batch` clips a step (data.batch_size x data.grad_accum x
    ranks): cfg.lr when cfg.lr_reference_batch is 0, else the linear scaling rule, cfg.lr x global_batch /
    cfg.lr_reference_batch (MAE and VideoMAE: base rate 1.5e-4 at a reference batch of 256)."""
    if cfg.lr_reference_batch == 0:
        return cfg.lr
    return cfg.lr * global_batch / cfg.lr_reference_batch


def scaled_optim(cfg: OptimConfig, global_batch: int) -> OptimConfig:
    """cfg with lr replaced by effective_lr (and lr_reference_batch 0): the schedule the run follows.
    min_lr stays absolute: ConfigError when the scaled peak falls below it."""
    lr = effective_lr(cfg, global_batch)
    check(
        cfg.min_lr <= lr,
        "optim.min_lr",
        f"{cfg.min_lr:g} is above the run's peak lr {lr:.3g} (optim.lr {cfg.lr:g} x global batch "
        f"{global_batch} / optim.lr_reference_batch {cfg.lr_reference_batch}): lower optim.min_lr or raise "
        "optim.lr",
    )
    return dataclasses.replace(cfg, lr=lr, lr_reference_batch=0)


def follow_schedule(scheduler: LambdaLR, base_lrs: Sequence[float]) -> None:
    """After a checkpoint's scheduler state is loaded: put back this run's base rates (its config at its
    world size), and set each group's lr to the schedule's value at the restored step. LambdaLR's
    load_state_dict restores the checkpoint's base_lrs: without this, a run resumed at another global
    batch or optim.lr would keep the old peak. Where they are the same, the lrs are those LambdaLR.step
    computed (base x factor), bit for bit."""
    scheduler.base_lrs = list(base_lrs)
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def resolve_precision(precision: str) -> str:
    """auto -> bf16 where CUDA supports it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: TrainConfig, world_size: int, universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for a training config; the optimizer and scheduler are client objects.
    universal: the engine will load a universal checkpoint (another world size's, train.elastic)."""
    stage = cfg.run.zero_stage
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.data.grad_accum,
        "train_batch_size": global_batch(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": resolve_precision(cfg.run.precision) == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 1_000_000_000,  # our metrics report progress, not DeepSpeed's log
        "wall_clock_breakdown": False,
    }
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    if stage >= 2:
        ds["zero_optimization"].update(
            {
                "overlap_comm": True,
                "contiguous_gradients": True,
                "reduce_bucket_size": 5e7,
            }
        )
    if stage == 3:
        ds["zero_optimization"].update(
            {
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5,  # small params (norms, biases) stay whole
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
                # Checkpoints hold 16-bit shards plus one consolidated module state on rank 0.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    return ds


def model_init_context(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """Build the model inside this (after init_distributed): under ZeRO-3 each rank materializes only
    its parameter shard, in the training dtype."""
    if cfg.run.zero_stage != 3:
        return contextlib.nullcontext()
    # DeepSpeed checks train_batch_size against the process group's size.
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world_size))


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, lr_scale: Callable[[str], float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: biases, norm weights, position embeddings and mask tokens get no weight decay;
    lr_scale(name), if given, scales a parameter's learning rate (layer-wise lr decay). Groups are
    ordered by scale, largest first: the first group's lr is the schedule's full lr."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Under ZeRO-3 p is a partitioned placeholder; ds_shape is the full tensor's shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        skip = ndim <= 1 or any(key in name for key in NO_DECAY_NAMES)
        scale = lr_scale(name) if lr_scale is not None else 1.0
        groups.setdefault((scale, not skip), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
        for (scale, decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))
    ]


def build_optimizer(
    model: nn.Module, o: OptimConfig, lr_scale: Callable[[str], float] | None = None
) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW over param_groups and its warmup-cosine LambdaLR, peaking at o.lr (as given: build_engine
    passes scaled_optim's)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay, o.lr, lr_scale),
        lr=o.lr,
        betas=tuple(o.betas),
        weight_decay=o.weight_decay,
    )
    # A partial (not a closure) so that LambdaLR.state_dict can save and restore it.
    return optimizer, LambdaLR(optimizer, functools.partial(_lr_factor, cfg=o))


def build_engine(
    model: nn.Module,
    cfg: TrainConfig,
    world_size: int,
    lr_scale: Callable[[str], float] | None = None,
    universal: bool = False,
) -> tuple[Any, Any, LambdaLR]:
    """-> (engine, optimizer, scheduler): a DeepSpeed engine over `model` with a client AdamW and the
    warmup-cosine LambdaLR to the peak effective_lr at this world size (each group's lr follows it, in
    proportion), stepped by `engine.step()`. ConfigError when that peak is below optim.min_lr.
    universal: set up to load a universal checkpoint (load_universal_checkpoint)."""
    optim = scaled_optim(cfg.optim, global_batch(cfg, world_size))
    optimizer, scheduler = build_optimizer(model, optim, lr_scale)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, universal),
    )
    return engine, ds_optimizer, ds_scheduler


def to_universal(checkpoint: Path, out: Path) -> None:
    """Convert a checkpoint folder (every rank's files in it) to DeepSpeed's universal format in `out`, a
    folder beside it: each parameter whole, with its AdamW moments, loadable at any world size and ZeRO
    stage. No process group needed. DeepSpeed also writes `latest_universal` into out's parent."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main

    args = {"input_folder": str(checkpoint), "output_folder": str(out), "keep_temp_folder": False}
    args |= {"num_extract_workers": 1, "num_merge_workers": 1, "strict": True, "inject_missing_state": True}
    main(argparse.Namespace(**args))


def load_universal_checkpoint(engine: Any, folder: Path) -> bool:
    """Collective. Load a universal checkpoint (to_universal) into an engine built with universal=True:
    weights, AdamW moments and step, the lr schedule's step (its rates stay this run's, follow_schedule).
    Two DeepSpeed 0.19.8 slips of its ZeRO-3 universal load are undone (harmless below ZeRO-3): every
    parameter group gets the first group's hyperparameters (the no-decay group would decay), and every
    flat group shares one AdamW step tensor (each optimizer step would advance it once per group).
    -> False when DeepSpeed loaded nothing."""
    base_lrs = list(engine.lr_scheduler.base_lrs)
    groups = engine.optimizer.param_groups
    hparams = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    path, _ = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        return False
    follow_schedule(engine.lr_scheduler, base_lrs)
    for group, saved in zip(engine.optimizer.param_groups, hparams, strict=True):
        group.update(saved)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return True


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors into a model built under model_init_context (ZeRO-3 partitions are gathered,
    filled on rank 0 and scattered again), or into a plain one. Strict: every key must fit."""
    params = list(model.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=partitioned):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if not partitioned or rank == 0:
            model.load_state_dict(state, strict=True)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module`, whole, on the CPU (gathers ZeRO-3 shards; collective:
    call on every rank)."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def export_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's module, whole, on the CPU, parameters in float32 (collective: call on every rank).

    Under bf16 the module holds 16-bit copies; the optimizer's fp32 master weights are the trained values,
    so parameters are gathered from those (deepspeed.utils.safe_get_full_fp32_param), buffers as they are.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = full_state_dict(engine.module)
    if engine.bfloat16_enabled():
        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is not None and name in state:
                state[name] = full.detach().cpu().clone()
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def consolidated_state(checkpoint: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A checkpoint folder (RUN/checkpoints/step-N, every rank's files in it) -> the model's full-precision
    state dict, rebuilt from the ZeRO shards by DeepSpeed's zero_to_fp32 (no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(checkpoint)
    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def default_extensions_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops are cached: the repository's .cache/ in a checkout, else
    ~/.cache/lvmae."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists() and os.access(repo, os.W_OK):
        return repo / ".cache" / "torch_extensions"
    return Path.home() / ".cache" / "lvmae" / "torch_extensions"


def init_distributed() -> None:
    """Join the process group from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...):
    gloo on CPU, nccl on GPU. Call once per process, before model_init_context."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "OMP_NUM_THREADS" not in os.environ:
        # The deepspeed launcher does not set it: ranks sharing the cores would oversubscribe them.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    atexit.register(release_shm_buffer)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def release_shm_buffer() -> None:
    """Unlink this rank's /dev/shm all-reduce buffer. DeepSpeed's CPU communication backend creates one
    per rank (about 67 MB, named by uid, MASTER_ADDR, MASTER_PORT and rank) and never removes it, so every
    CPU run would leave its ranks' buffers in memory until reboot. Ranks map it once, at init: removing
    the name at exit frees the memory once every rank has gone."""
    env = os.environ
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR')}_"
        f"{env.get('MASTER_PORT')}_{env.get('RANK')}"
    )
    with contextlib.suppress(OSError):
        os.unlink(name)


__all__ = [
    "build_engine",
    "build_optimizer",
    "consolidated_state",
    "deepspeed_config",
    "effective_lr",
    "export_state_dict",
    "follow_schedule",
    "full_state_dict",
    "init_distributed",
    "load_full_state",
    "load_universal_checkpoint",
    "lr_at",
    "model_init_context",
    "param_groups",
    "resolve_precision",
    "scaled_optim",
    "to_universal",
]
