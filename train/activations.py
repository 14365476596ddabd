"""Activation memory of one MAE training step, counted exactly (train.memory's `activations` part).

    count = activation_bytes(model_cfg, batch=8, dtype=torch.bfloat16)
    count.saved(checkpointing=False)   # bytes autograd holds for backward at the end of the forward

The model's real forward and mae_loss run on the meta device (no memory, no compute) under a saved-tensor
hook, the model built with `pos_table=meta_table` (its position tables as shapes alone). The meta device
has no fused attention kernel, so attention is counted as the flash kernels (CUDA's and the CPU's alike)
save it: q, k, v, the output and a float32 log-sum-exp per query and head, never the N x N score matrix.
With activation checkpointing, each block keeps its input, and one block's activations exist again while
it is recomputed in backward.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lvmae.config import MAEConfig
from lvmae.losses import mae_loss
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.masking import MaskPlan


class _FlashAttention(torch.autograd.Function):
    """What F.scaled_dot_product_attention's flash kernels save, on the meta device: q, k, v, the output
    (laid out (B, N, heads, head_dim), as both kernels return it) and a float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, n, hs = q.shape
        out = q.new_empty((b, n, h, hs)).transpose(1, 2)
        lse = q.new_empty((b, h, n), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FlashAccounting(TorchFunctionMode):
    """Within it (this thread only), F.scaled_dot_product_attention is _FlashAttention."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _FlashAttention.apply(*args[:3])
        return func(*args, **(kwargs or {}))


@dataclass
class ActivationCount:
    """Saved-for-backward bytes of one step's forward and loss, by where they were saved."""

    encoder_blocks: list[int] = field(default_factory=list)  # each block's own saved bytes
    decoder_blocks: list[int] = field(default_factory=list)
    block_inputs: int = 0  # what checkpointed blocks keep: each block's input
    other: int = 0  # embeddings, gathers, final norms, head, loss
    largest_hidden: int = 0  # bytes of the largest MLP hidden activation (N x hidden), one sample batch

    def saved(self, checkpointing: bool) -> int:
        """Bytes saved for backward at the end of the forward (checkpointing: block inputs only)."""
        blocks = self.encoder_blocks + self.decoder_blocks
        if checkpointing:
            return self.other + self.block_inputs
        return self.other + sum(blocks)

    def recompute(self, checkpointing: bool) -> int:
        """With checkpointing, the largest block's activations, alive again while it is recomputed."""
        return max(self.encoder_blocks + self.decoder_blocks, default=0) if checkpointing else 0


def meta_table(kind: str, dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """A position table's shape without its values (a real one is N x D of float64 work on the CPU)."""
    return torch.empty((grid[0] * grid[1] * grid[2], dim), device="meta")


def _meta_plan(plan: MaskPlan) -> MaskPlan:
    return MaskPlan(*(t.to("meta") for t in (plan.mask, plan.selected, plan.ids_visible, plan.ids_selected)))


@contextmanager
def _block_labels(model: torch.nn.Module, labels: list[str | None]) -> Iterator[None]:
    """While a transformer block runs, labels[-1] names it ('encoder.3', 'decoder.0')."""
    handles = []
    for part in ("encoder", "decoder"):
        blocks = model.encoder.transformer.blocks if part == "encoder" else model.decoder.blocks
        for i, block in enumerate(blocks):
            name = f"{part}.{i}"

            def pre(_m, args, name=name):
                labels.append(name)

            def post(_m, _args, _out):
                labels.pop()

            handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def activation_bytes(model_cfg: MAEConfig, batch: int, dtype: torch.dtype = torch.float32) -> ActivationCount:
    """Count, exactly, the bytes one training step saves for backward: the model's forward and mae_loss on
    the meta device in `dtype` (bf16: DeepSpeed's bf16 weights and inputs, no autocast), blocks without
    checkpointing (ActivationCount.saved applies it). The masks are drawn on the CPU (their sizes are all
    the count needs); adaptive masking gets uniform random priorities (the same shapes)."""
    cfg = copy.deepcopy(model_cfg).resolved()
    cfg.encoder.grad_checkpointing = cfg.decoder.grad_checkpointing = False
    v = cfg.video
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = MaskedVideoAutoencoder(cfg, pos_table=meta_table).to(dtype=dtype).train()
    priority = torch.rand((batch, *v.grid), generator=gen) if cfg.masking.needs_priority else None
    plan = _meta_plan(model.plan(batch, gen, priority, "cpu"))
    video = torch.empty((batch, v.in_chans, v.num_frames, v.img_size, v.img_size), device="meta", dtype=dtype)
    codes = (
        torch.empty((batch, *v.grid), device="meta", dtype=torch.int64)
        if cfg.target.kind == "tokens"
        else None
    )

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    by_label: dict[str | None, int] = {}
    labels: list[str | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen and key not in params and t.device.type == "meta":
            seen.add(key)
            by_label[labels[-1]] = by_label.get(labels[-1], 0) + storage.nbytes()
        return t

    inputs: list[int] = []

    def record_input(_m, args):
        inputs.append(args[0].untyped_storage().nbytes())

    hooks = [
        b.register_forward_pre_hook(record_input)
        for b in (*model.encoder.transformer.blocks, *model.decoder.blocks)
    ]
    try:
        with (
            _block_labels(model, labels),
            _FlashAccounting(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            mae_loss(cfg, model(video, plan=plan), video=video, codes=codes)
    finally:
        for h in hooks:
            h.remove()
    enc = [by_label.get(f"encoder.{i}", 0) for i in range(len(model.encoder.transformer.blocks))]
    dec = [by_label.get(f"decoder.{i}", 0) for i in range(len(model.decoder.blocks))]
    elem = torch.empty((), dtype=dtype).element_size()
    hidden = max(
        plan.num_visible * int(cfg.encoder.embed_dim * cfg.encoder.mlp_ratio),
        (plan.num_visible + plan.num_selected) * int(cfg.decoder.embed_dim * cfg.decoder.mlp_ratio),
    )
    return ActivationCount(enc, dec, sum(inputs), by_label.get(None, 0), batch * hidden * elem)
