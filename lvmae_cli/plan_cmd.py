"""`lvmae plan RECIPE... [overrides] --gpu-memory 80GiB --world-size N`: will it fit? (train.memory)

Prints one GPU's peak memory in a training step of a pretraining recipe by component, whether it fits,
the largest batch and longest clip that fit, and the cheapest ZeRO stage / checkpointing; exits 1 when the
recipe will not fit (docs/training.md, "Will it fit?").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lvmae.errors import UserError
from lvmae_cli.train_cmd import split_config_args

GIB = 2**30


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def format_report(r: dict) -> str:
    """The report as `lvmae plan` prints it: a table by component, then the verdicts."""
    c = r["recipe"]
    ckpt = "on" if c["activation_checkpointing"] else "off"
    lines = [
        f"ViT-{c['preset']} MAE ({c['params'] / 1e6:.1f} M parameters), {c['frames']} frames of {c['img_size']} px: "
        f"{c['tokens']} tokens, the encoder sees {c['visible']}, the decoder rebuilds {c['decoded']} ({c['decoder']}, "
        f"{c['target']} targets)",
        f"batch {c['batch_size']} per GPU, {c['precision']}, ZeRO-{c['zero_stage']}, activation checkpointing {ckpt}, "
        f"{r['world_size']} GPU{'s' if r['world_size'] > 1 else ''} of {_gib(r['gpu_bytes'])} GiB",
        "",
        f"{'per GPU, at the step peak':<36} {'GiB':>9}",
    ]
    lines += [f"  {name:<34} {_gib(n):>9}" for name, n in r["parts"].items()]
    lines += [
        f"  {'total':<34} {_gib(r['total_bytes']):>9}",
        f"  {'usable (less 10% and 1 GiB)':<34} {_gib(r['usable_bytes']):>9}",
        "",
    ]
    share = r["total_bytes"] / max(r["usable_bytes"], 1)
    lines.append(f"fits: {'yes' if r['fits'] else 'NO'} ({100 * share:.0f}% of the usable memory)")
    lines.append(f"largest batch per GPU that fits: {r['largest_batch']}")
    longest = r["longest_clip_frames"]
    at_limit = " (the search's limit)" if longest >= r["search_limit_frames"] else ""
    lines.append(f"longest clip at batch 1: {longest} frames{at_limit}")
    rec = r["recommended"]
    if rec is None:
        lines.append(
            "recommended: none fits: lower data.batch_size, the clip length or the model, or add GPUs"
        )
    else:
        how = "with" if rec["activation_checkpointing"] else "without"
        lines.append(
            f"recommended: run.zero_stage={rec['zero_stage']} run.activation_checkpointing="
            f"{str(rec['activation_checkpointing']).lower()} (the cheapest that fits batch {c['batch_size']}: "
            f"ZeRO-{rec['zero_stage']} {how} recomputation)"
        )
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from train.config import load_train_config
    from train.memory import parse_bytes, report

    recipes, overrides = split_config_args(args.config)
    for recipe in recipes:
        text = Path(recipe).read_text()
        if any(line.startswith(("tokenizer:", "finetune:")) for line in text.splitlines()):
            raise UserError(
                f"{recipe}: lvmae plan covers pretraining recipes (lvmae train mae), not this one"
            )
    # The data set is not read: placeholders stand in for the recipe's mandatory data.url / data.tokens.
    cfg = load_train_config(recipes, ["data.url=unused", "data.tokens=unused", *overrides])
    if args.gpu_memory is not None:
        try:
            gpu_bytes = parse_bytes(args.gpu_memory)
        except ValueError as err:
            raise UserError(f"--gpu-memory: {err}") from None
    else:
        import torch

        gpu_bytes = (
            torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 2**30
        )
    if args.world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {args.world_size}")
    result = report(cfg, gpu_bytes, args.world_size)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    if not result["fits"]:
        print(
            f"lvmae plan: warning: this recipe needs {result['total_bytes'] / 2**30:.1f} GiB per GPU at its peak, "
            f"more than the {result['usable_bytes'] / 2**30:.1f} GiB usable: it will run out of memory",
            file=sys.stderr,
        )
        return 1
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="will it fit? per-GPU memory of a pretraining recipe, the largest batch, what to set",
        description="Predict one GPU's peak memory in a training step of a pretraining recipe (lvmae train "
        "mae): weights, gradients and optimizer state by precision, ZeRO stage and world size, activations "
        "counted from the model's forward on the meta device, the batch in flight. Prints the table, the "
        "largest batch and longest clip that fit, and the cheapest ZeRO stage / checkpointing that fits. "
        "Exits 1 when the recipe will not fit (docs/training.md, 'Will it fit?').",
    )
    p.add_argument("config", nargs="+", metavar="RECIPE_OR_OVERRIDE", help="configs/*.yaml and key=value")
    p.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory of one GPU, e.g. 80GiB, 141GB (default: this machine's first GPU, else 80GiB)",
    )
    p.add_argument("--world-size", type=int, default=1, help="GPUs the run uses in all (default 1)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_plan)
