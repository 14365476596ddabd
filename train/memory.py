"""Will it fit? The per-GPU memory of one pretraining step, predicted from a recipe (`lvmae plan`).

    plan = plan_step(cfg, world_size=8)           # cfg: a TrainConfig (lvmae train mae's recipes)
    plan.total, plan.parts                        # bytes at the step's peak, and by component
    largest_batch(cfg, usable_bytes(80 * GIB), 8)  # the largest data.batch_size that fits
    recommend(cfg, usable_bytes(80 * GIB), 8)      # the cheapest ZeRO stage / checkpointing that fits
    report(cfg, 80 * GIB, 8)                       # all of it, JSON-able: what `lvmae plan` prints

The prediction adds:
- Model state, by precision, ZeRO stage and world size (`state_bytes`): bytes per parameter as DeepSpeed
  0.19 holds them with train.engine's config (measured at world size 1 by bench/plan_check.py), the parts
  ZeRO partitions divided by the world size.
- Activations (train.activations): the bytes autograd saves for backward, counted exactly by running the
  model's real forward and loss on the meta device under a saved-tensor hook, attention counted as the
  flash kernels save it; with activation checkpointing, block inputs plus one recomputed block.
- The backward's working memory: the gradients of the largest MLP hidden layer (two N x hidden tensors)
  and the residual stream's gradient; an estimate, checked on a GPU by bench/gpu_check.sh.
- The batches in flight: the clips on the device in the training dtype; where DALI decodes on the GPU,
  also the float32 batch they were cast from and the batches the trainer reads ahead (float32, on the
  GPU too); codes and priorities.
Not counted: the CUDA context, cuBLAS/NCCL workspaces and the caching allocator's fragmentation: that is
why `usable_bytes` keeps a reserve of the GPU's memory back.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from lvmae.mae import MaskedVideoAutoencoder
from lvmae.masking import decoder_count, num_visible
from train.activations import activation_bytes, meta_table
from train.config import TrainConfig
from train.stream import READ_AHEAD_BATCHES

GIB = 2**30
RESERVE_BYTES = GIB  # CUDA context, cuBLAS and NCCL workspaces
RESERVE_FRACTION = 0.10  # the caching allocator's fragmentation
ZERO3_BUCKET = 50_000_000  # train.engine: reduce_bucket_size / stage3_prefetch_bucket_size (elements)


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '81920MiB', '85899345920' -> bytes (GiB/MiB binary, GB/MB decimal)."""
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6}
    units |= {"mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB, 141GB, 81920MiB)")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def usable_bytes(gpu_bytes: int) -> int:
    """What a training step may use of a GPU: its memory less RESERVE_BYTES and RESERVE_FRACTION."""
    return int(gpu_bytes * (1 - RESERVE_FRACTION)) - RESERVE_BYTES


# ------------------------------------------------------------------------------------------ model state


def state_bytes(n_params: int, precision: str, zero_stage: int, world_size: int) -> dict[str, int]:
    """Bytes of model state one rank holds during a step -> {weights, gradients, optimizer}.

    bf16: 2-byte weights and gradients, and the optimizer's float32 master weights plus AdamW's two
    moments (12 bytes a parameter); DeepSpeed partitions the master weights and moments over the ranks at
    every stage (stage 0 runs its BF16_Optimizer, which partitions them too), gradients from stage 2 and
    weights at stage 3. fp32: 4-byte weights and gradients; from stage 1 DeepSpeed's ZeRO optimizers keep
    their own float32 copy of the weight partition beside AdamW's moments (12 bytes a parameter, divided
    over the ranks); at stage 0 AdamW runs on the weights themselves (8 bytes).
    Stage 3 (train.engine's config, max_reuse_distance 1e9) keeps every parameter it gathered for the
    forward until the backward has used it: the whole model is resident at the peak, beside its shard, and
    the gradients are reduced into float32 partitions plus a bucket of ZERO3_BUCKET elements.
    """
    p, n = n_params, world_size
    e = 2 if precision == "bf16" else 4
    if precision == "bf16" or zero_stage >= 1:
        optimizer = 12 * p // n
    else:
        optimizer = 8 * p
    if zero_stage == 3:
        weights = e * p // n + e * p
        gradients = 4 * p // n + e * min(p, ZERO3_BUCKET)
    else:
        weights = e * p
        gradients = e * p // n if zero_stage == 2 else e * p
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer}


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class StepPlan:
    """One rank's predicted peak during a training step, by component (bytes)."""

    parts: dict[str, int]
    n_params: int
    batch: int
    frames: int
    precision: str
    zero_stage: int
    world_size: int
    checkpointing: bool
    decoded: int  # tokens the decoder reconstructs per clip
    visible: int  # tokens the encoder sees per clip

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def activations(self) -> int:
        return self.parts["activations (saved for backward)"]


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def plan_precision(cfg: TrainConfig) -> str:
    """The precision a GPU run of `cfg` trains in: `auto` means bf16 there (train.engine.resolve_precision)."""
    return "bf16" if cfg.run.precision == "auto" else cfg.run.precision


def plan_step(cfg: TrainConfig, world_size: int = 1, gpu_decode: bool | None = None) -> StepPlan:
    """Predict one rank's peak memory for a TrainConfig (lvmae train mae) on GPUs, at its data.batch_size,
    run.zero_stage, run.activation_checkpointing and precision (`auto`: bf16). gpu_decode: the loader
    decodes on the GPU (DALI); None: when data.decoder is auto or dali."""
    model_cfg = cfg.model_config()
    precision = plan_precision(cfg)
    dtype = _dtype(precision)
    b, ckpt, stage = cfg.data.batch_size, bool(cfg.run.activation_checkpointing), cfg.run.zero_stage
    with torch.device("meta"):
        n_params = sum(p.numel() for p in MaskedVideoAutoencoder(model_cfg, meta_table).parameters())
    acts = activation_bytes(model_cfg, b, dtype)
    v = model_cfg.video
    elem = torch.empty((), dtype=dtype).element_size()
    clip = b * v.in_chans * v.num_frames * v.img_size**2
    if gpu_decode is None:
        gpu_decode = cfg.data.decoder in ("auto", "dali")
    # The step's clips in the training dtype; decoded on the GPU, also the float32 batch they were cast
    # from and the batches read ahead (train.loader.READ_AHEAD_BATCHES, and one in the reader's hands).
    on_gpu = (1 + READ_AHEAD_BATCHES + 1) * clip * 4 if gpu_decode else 0
    batch = clip * elem + on_gpu + b * v.num_tokens * (8 + 4)
    state = state_bytes(n_params, precision, stage, world_size)
    m = model_cfg.masking
    visible = num_visible(v.grid, m.encoder, m.encoder_ratio)
    decoded = decoder_count(v.num_tokens, v.num_tokens - visible, m.decoder, m.decoder_budget)
    # the residual stream's gradient, at its widest (the decoder's sequence, the wider model's width)
    residual = b * (visible + decoded) * max(model_cfg.encoder.embed_dim, model_cfg.decoder.embed_dim) * elem
    parts = {
        "weights": state["weights"],
        "gradients": state["gradients"],
        "optimizer (master + AdamW)": state["optimizer"],
        "activations (saved for backward)": acts.saved(ckpt),
        "recomputed block (checkpointing)": acts.recompute(ckpt),
        "backward working set": 2 * acts.largest_hidden + residual,
        "batches on the device": batch,
    }
    return StepPlan(parts, n_params, b, v.num_frames, precision, stage, world_size, ckpt, decoded, visible)


def with_overrides(cfg: TrainConfig, **changes: object) -> TrainConfig:
    """A copy of a TrainConfig with data.batch_size / run.* / model.video.num_frames changed."""
    out = copy.deepcopy(cfg)
    sections = {"batch_size": out.data, "num_frames": out.model.video}
    sections |= dict.fromkeys(("zero_stage", "activation_checkpointing", "precision"), out.run)
    for key, value in changes.items():
        setattr(sections[key], key, value)
    return out


def largest_batch(cfg: TrainConfig, budget: int, world_size: int = 1, limit: int = 4096) -> int:
    """The largest data.batch_size whose step fits in `budget` bytes (0: not even one clip). From batch 2
    on, every part of the plan is affine in the batch (at batch 1 a few tensors are views that are copies
    at larger batches), so the plans at batch 2 and 3 give the rest."""
    one, two, three = (plan_step(with_overrides(cfg, batch_size=b), world_size).total for b in (1, 2, 3))
    if one > budget:
        return 0
    if two > budget:
        return 1
    per_clip = max(three - two, 1)
    return int(min(limit, 2 + (budget - two) // per_clip))


def longest_clip(cfg: TrainConfig, budget: int, world_size: int = 1, limit: int = 4096) -> int:
    """The longest clip (frames, a multiple of the tubelet, at batch 1) whose step fits, by bisection over
    the tubelet count; 0 if even one tubelet of frames does not fit."""
    t = cfg.model.video.tubelet_size

    def fits(frames: int) -> bool:
        return plan_step(with_overrides(cfg, batch_size=1, num_frames=frames), world_size).total <= budget

    lo, hi = 0, limit // t
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * t):
            lo = mid
        else:
            hi = mid - 1
    return lo * t


# Cheapest first: ZeRO stages before checkpointing (recomputing every block costs about a third more
# compute; ZeRO-2/3 cost communication), and stage 3 last (it re-gathers every parameter in forward and
# backward).
CHOICES = [(1, False), (2, False), (3, False), (1, True), (2, True), (3, True)]


def recommend(cfg: TrainConfig, budget: int, world_size: int = 1) -> tuple[int, bool] | None:
    """The cheapest (zero_stage, activation_checkpointing) with which the recipe's batch fits; None."""
    for stage, ckpt in CHOICES:
        if (
            plan_step(with_overrides(cfg, zero_stage=stage, activation_checkpointing=ckpt), world_size).total
            <= budget
        ):
            return stage, ckpt
    return None


__all__ = [
    "GIB",
    "StepPlan",
    "largest_batch",
    "longest_clip",
    "parse_bytes",
    "plan_step",
    "recommend",
    "state_bytes",
    "usable_bytes",
]


# ---------------------------------------------------------------------------------------------- report


def report(cfg: TrainConfig, gpu_bytes: int, world_size: int = 1, search_limit: int = 4096) -> dict:
    """Everything `lvmae plan` prints, JSON-able: the step's parts, whether it fits, the largest batch, the
    longest clip at batch 1 and the cheapest ZeRO stage / checkpointing that fits the recipe's batch."""
    plan = plan_step(cfg, world_size)
    budget = usable_bytes(gpu_bytes)
    choice = recommend(cfg, budget, world_size)
    m = cfg.model_config()
    return {
        "recipe": {
            "preset": m.preset,
            "frames": m.video.num_frames,
            "img_size": m.video.img_size,
            "tokens": m.video.num_tokens,
            "visible": plan.visible,
            "decoded": plan.decoded,
            "decoder": m.masking.decoder,
            "target": m.target.kind,
            "params": plan.n_params,
            "batch_size": plan.batch,
            "precision": plan.precision,
            "zero_stage": plan.zero_stage,
            "activation_checkpointing": plan.checkpointing,
        },
        "world_size": world_size,
        "gpu_bytes": gpu_bytes,
        "usable_bytes": budget,
        "parts": plan.parts,
        "total_bytes": plan.total,
        "fits": plan.total <= budget,
        "largest_batch": largest_batch(cfg, budget, world_size),
        "longest_clip_frames": longest_clip(cfg, budget, world_size, search_limit),
        "search_limit_frames": search_limit,
        "recommended": None
        if choice is None
        else {"zero_stage": choice[0], "activation_checkpointing": choice[1]},
    }
