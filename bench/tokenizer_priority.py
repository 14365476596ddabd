"""Does the tokenizer's priority find what changes? Lift of its top-15% tokens on procedural clips.

Clips (ingest.scenes): a still textured background, textured objects sliding over it, flickering patches;
the pixels that change are known. A tokenizer is trained on such clips (plain PyTorch, one process) and
evaluated on held-out ones every --eval-every steps:

- lift: the share of each clip's top-15% priority tokens that fall on changing tokens (at least 5% of the
  tubelet's pixels differ from the frame before), divided by the changing tokens' share. 1.0 is chance.
  The same figure for a frame-difference score sits beside it (no learning: a reference, not a target).
- PSNR and MSE of the reconstruction the tokenizer gives at inference (top keep_ratio tokens by
  priority) and with every token kept; codebook use; the priority diagnostics of lvmae.diagnostics.

    python bench/tokenizer_priority.py --settings hold_context hold --steps 2000
    python bench/tokenizer_priority.py --grid 128f --settings hold_context --steps 300 --batch 1

Settings are named overrides of the tokenizer config (SETTINGS below, or key=value,... inline with a
name: "mine:topk=sigmoid,context_ratio=0"). Results: bench/results/tokenizer_priority_<grid>.json (one
entry per setting and seed, updated in place), and the curves printed as they come.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.scenes import SceneSpec, moving_objects_clip, token_change
from lvmae import diagnostics as dg
from lvmae.config import VideoSpec
from lvmae.tokenizer import Tokenizer, tokenizer_loss
from lvmae.tokenizer_config import TokenizerConfig

RESULTS = Path(__file__).resolve().parent / "results"

# The demo tokenizer (the tokenizer section of configs/tokenizer_demo_cpu.yaml) and, at the 128-frame
# recipe's grid, a narrow one.
DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tokenizer_demo_cpu.yaml"
GRIDS = {
    "demo": OmegaConf.to_container(OmegaConf.load(DEMO_RECIPE).tokenizer),
    "128f": dict(
        video=dict(num_frames=128, img_size=224, tubelet_size=2, patch_size=16),
        base_channels=4,
        channel_mult=[1, 1, 2, 2, 4],
        num_res_blocks=0,
        num_groups=4,
        norm="channel",
        patch_skip=True,
        fsq_levels=[8, 8, 8, 5, 5, 5],
        scorer_channels=16,
    ),
}
# 128 frames at 224 px: objects a similar share of the frame but slower per frame, over a longer clip.
# Objects tinted half way to a colour of their own: at 16-pixel tokens of a few bits, an object with the
# background's colour statistics is close to invisible to the tokenizer (docs/tokenizer.md, --object-tint).
SCENES = {
    "demo": SceneSpec(object_tint=0.5),
    "128f": SceneSpec(num_objects=(1, 3), speed=(0.5, 1.5), num_flickers=(1, 2), object_tint=0.5),
}

SETTINGS: dict[str, dict] = {
    # The library's defaults: perturbed top-k (sigma 1, 128 draws), `hold` context, context_ratio 0.25.
    "hold_context": dict(context_ratio=0.25),
    # The rest vary one thing at a time from `hold` without context tokens (the default when they ran).
    "hold": dict(context_ratio=0.0),
    # The selection before issue 8 (sigmoid straight-through top-k, zero time padding, no decoder context)
    # on today's architecture; the code before issue 8 itself runs from a checkout (docs/tokenizer.md).
    "sigmoid_none": dict(topk="sigmoid", temporal_padding="zeros", decoder_context="none", context_ratio=0.0),
    "perturbed_none": dict(decoder_context="none", context_ratio=0.0),
    "temporal_mean_context": dict(decoder_context="temporal_mean", context_ratio=0.25),
    "keyframe": dict(decoder_context="keyframe", context_ratio=0.0),
    "hold_sigmoid": dict(topk="sigmoid", context_ratio=0.0),
    "hold_sigma0.5_s16": dict(topk_sigma=0.5, topk_samples=16, context_ratio=0.0),
    "hold_warmup": dict(keep_warmup_steps=300, context_ratio=0.0),
    "hold_frames_only": dict(scorer_input="frames", context_ratio=0.0),
    "hold_causal": dict(causal=True, context_ratio=0.0),
}
# The paper's design (configs/overlays/tokenizer_paper.yaml), then the paper plus one of our departures at a time
# (docs/tokenizer.md, "Departures from the paper"); all our departures together are `hold_context`.
PAPER = OmegaConf.to_container(
    OmegaConf.load(
        Path(__file__).resolve().parents[1] / "configs" / "overlays" / "tokenizer_paper.yaml"
    ).tokenizer
)
DEPARTURES = {
    "hold": dict(decoder_context="hold"),
    "mask_token": dict(dropped_tokens="mask_token"),
    "context": dict(context_ratio=0.25),
    "standardized": dict(standardize_logits=True),
    "differences": dict(scorer_input="frames_and_differences"),
    "keep25": dict(keep_ratio=0.25),
}
SETTINGS["paper"] = dict(PAPER)
SETTINGS.update({f"paper+{name}": {**PAPER, **over} for name, over in DEPARTURES.items()})


def parse_setting(text: str) -> tuple[str, dict]:
    if ":" not in text:
        if text not in SETTINGS:
            raise SystemExit(f"unknown setting {text!r}; known: {', '.join(SETTINGS)}")
        return text, SETTINGS[text]
    name, _, body = text.partition(":")
    over: dict = dict(SETTINGS.get(name, {}))
    for item in filter(None, re.split(r",(?![^\[]*\])", body)):  # commas outside [...]
        k, _, v = item.partition("=")
        try:
            over[k] = json.loads(v)
        except ValueError:
            over[k] = v  # a bare word: a string
    return name, over


def build_config(grid: str, over: dict) -> TokenizerConfig:
    args = {**GRIDS[grid], **over}
    args["video"] = VideoSpec(**args["video"])
    known = {f for f in TokenizerConfig.__dataclass_fields__}
    return TokenizerConfig(**{k: v for k, v in args.items() if k in known})


def clips(seeds: range, cfg: TokenizerConfig, scene: SceneSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """-> video (N, 3, T, H, W) uint8, changing tokens (N, T', H', W') bool."""
    v = cfg.video
    vids, regions = [], []
    for s in seeds:
        c = moving_objects_clip(s, v.num_frames, v.img_size, scene)
        vids.append(torch.from_numpy(c.video).permute(3, 0, 1, 2))
        regions.append(torch.from_numpy(token_change(c.changed, v.tubelet_size, v.patch_size)))
    return torch.stack(vids), torch.stack(regions)


def lr_at(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


@torch.no_grad()
def evaluate(model: Tokenizer, video_u8: torch.Tensor, region: torch.Tensor, batch: int) -> dict:
    cfg = model.cfg
    was = model.training
    model.eval()
    out: dict[str, list] = {k: [] for k in ("codes", "prio", "psnr", "psnr_all", "ssim", "mse")}
    for i in range(0, len(video_u8), batch):
        v = video_u8[i : i + batch].float() / 255
        codes, prio = model.encode(v)
        recon = model.decode_codes(codes, prio)
        full = model.decode_codes(codes, prio, keep_ratio=1.0) if _has_keep_arg(model) else recon
        out["codes"].append(codes)
        out["prio"].append(prio.float())
        out["psnr"].append(dg.psnr(recon, v))
        out["psnr_all"].append(dg.psnr(full, v))
        out["ssim"].append(dg.ssim(recon, v))
        out["mse"].append((recon.clamp(0, 1) - v).pow(2).flatten(1).mean(1))
    model.train(was)
    prio = torch.cat(out["prio"])
    video = video_u8.float() / 255
    fd = dg.frame_difference(video, cfg.video.tubelet_size, cfg.video.patch_size)
    diag = dg.priority_diagnostics(prio, fd)
    return {
        "lift": round(dg.lift(prio, region), 3),
        "lift_frame_diff": round(dg.lift(fd, region), 3),
        "region_share": round(float(region.float().mean()), 4),
        "psnr": round(float(torch.cat(out["psnr"]).mean()), 2),
        "psnr_all_tokens": round(float(torch.cat(out["psnr_all"]).mean()), 2),
        "ssim": round(float(torch.cat(out["ssim"]).mean()), 4),
        "mse": round(float(torch.cat(out["mse"]).mean()), 5),
        **{k: round(v, 4) for k, v in dg.codebook_usage(torch.cat(out["codes"]), cfg.codebook_size).items()},
        "priority": diag,
    }


def _has_keep_arg(model: Tokenizer) -> bool:
    return "keep_ratio" in inspect.signature(model.decode_codes).parameters


def train_and_measure(cfg: TokenizerConfig, args: argparse.Namespace, seed: int, scene: SceneSpec) -> dict:
    torch.manual_seed(seed)
    model = Tokenizer(cfg)
    train_v, _ = clips(range(seed * 100_000, seed * 100_000 + args.train_clips), cfg, scene)
    eval_v, eval_r = clips(range(10**9, 10**9 + args.eval_clips), cfg, scene)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    new_api = "generator" in inspect.signature(model.forward).parameters
    curve, started, losses = [], time.perf_counter(), []
    pick = torch.Generator().manual_seed(seed)
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "seconds": round(time.perf_counter() - started, 1)}
            row["train_loss"] = round(float(np.mean(losses[-50:])), 5) if losses else None
            row.update(evaluate(model, eval_v, eval_r, args.batch))
            curve.append(row)
            pt = row["priority"]["top_share_per_time"]
            print(
                f"  step {step:5d}  lift {row['lift']:.2f} (frame diff {row['lift_frame_diff']:.2f})  "
                f"psnr {row['psnr']:.2f} (all {row['psnr_all_tokens']:.2f})  loss {row['train_loss']}  "
                f"codes {row['used_share']:.2f}  top per t {[round(x, 2) for x in pt]}  {row['seconds']} s",
                flush=True,
            )
        if step == args.steps:
            break
        idx = torch.randint(len(train_v), (args.batch,), generator=pick)
        video = train_v[idx].float() / 255
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.min_lr, args.warmup)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if new_api:
            out = model(video, generator=gen, keep_ratio=cfg.keep_ratio_at(step))
        else:
            out = model(video)
        loss, parts = tokenizer_loss(out, video)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(parts["recon"]))
    if args.save:
        torch.save(model.state_dict(), args.save)  # our own file, for analysis; never loaded from elsewhere
    result = {"curve": curve, "final": curve[-1], "seconds": round(time.perf_counter() - started, 1)}
    if args.transfer:
        result["transfer"] = transfer(model, args)
    return result


def transfer(model: Tokenizer, args: argparse.Namespace) -> dict:
    """The trained tokenizer, unchanged (it is convolutional), on clips of another grid's size and scene."""
    video = VideoSpec(**GRIDS[args.transfer]["video"])
    other = Tokenizer(dataclasses.replace(model.cfg, video=video))
    other.load_state_dict(model.state_dict())
    v, r = clips(range(10**9, 10**9 + args.transfer_clips), other.cfg, SCENES[args.transfer])
    row = {"grid": args.transfer, "clips": args.transfer_clips, **evaluate(other, v, r, 1)}
    print(
        f"  on {args.transfer} clips ({video.num_frames} x {video.img_size} px, grid {video.grid}): lift "
        f"{row['lift']:.2f} (frame diff {row['lift_frame_diff']:.2f})  psnr {row['psnr']:.2f}",
        flush=True,
    )
    return row


def table(results: dict, pattern: str = "") -> str:
    """The results JSON as a markdown table: one row per setting whose name matches the regular expression
    `pattern` (mean and range over its seeds), in the order of SETTINGS."""
    groups: dict[str, list[dict]] = {}
    for entry in results.values():
        if re.search(pattern, entry["setting"]):
            groups.setdefault(entry["setting"], []).append(entry)
    order = list(SETTINGS)

    def rank(name: str) -> tuple[int, str]:
        base = max((s for s in order if name.startswith(s)), key=len, default=None)
        return (order.index(base) if base else len(order), name)

    def cell(values: list[float], digits: int) -> str:
        mean = sum(values) / len(values)
        if len(values) == 1:
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    lines = [
        "| setting | seeds | lift at 2,000 steps | best lift (step) | frame diff | PSNR dB | PSNR all tokens | "
        "codes used | top-15% at first / last t | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entries in sorted(groups.items(), key=lambda item: rank(item[0])):
        finals = [e["final"] for e in entries]
        best = max(((r["lift"], r["step"]) for e in entries for r in e["curve"]), key=lambda x: x[0])
        lines.append(
            f"| {name} | {len(entries)} | {cell([f['lift'] for f in finals], 2)} | {best[0]:.2f} ({best[1]}) | "
            f"{cell([f['lift_frame_diff'] for f in finals], 2)} | {cell([f['psnr'] for f in finals], 2)} | "
            f"{cell([f['psnr_all_tokens'] for f in finals], 2)} | {cell([f['used_share'] for f in finals], 2)} | "
            f"{cell([f['priority']['top_share_per_time'][0] for f in finals], 2)} / "
            f"{cell([f['priority']['top_share_per_time'][-1] for f in finals], 2)} | "
            f"{cell([e['seconds'] / 60 for e in entries], 0)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=tuple(GRIDS), default="demo")
    p.add_argument("--settings", nargs="+", default=["hold_context"], help="names or NAME:key=value,...")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--train-clips", type=int, default=512)
    p.add_argument("--eval-clips", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/...)")
    p.add_argument("--transfer", choices=tuple(GRIDS), help="also evaluate the trained model on this grid")
    p.add_argument("--transfer-clips", type=int, default=8)
    p.add_argument("--save", default=None, help="write the trained state_dict here (analysis)")
    p.add_argument("--object-tint", type=float, default=None, help="override the scene's object_tint")
    p.add_argument("--label", default="", help="suffix for the setting names (e.g. the code version)")
    p.add_argument(
        "--table",
        nargs="?",
        const="",
        metavar="REGEX",
        help="print the results file as a markdown table (settings matching REGEX) and stop",
    )
    args = p.parse_args(argv)
    if args.table is not None:
        out = Path(args.out or RESULTS / f"tokenizer_priority_{args.grid}.json")
        print(table(json.loads(out.read_text()), args.table))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or RESULTS / f"tokenizer_priority_{args.grid}.json")
    scene = SCENES[args.grid]
    if args.object_tint is not None:
        scene = dataclasses.replace(scene, object_tint=args.object_tint)
        args.label += f"_tint{args.object_tint:g}"
    for text in args.settings:
        name, over = parse_setting(text)
        cfg = build_config(args.grid, over)
        for seed in map(int, args.seeds.split(",")):
            key = f"{name}{args.label}/seed{seed}"
            print(
                f"{key}: {over}  ({args.steps} steps, batch {args.batch}, {torch.get_num_threads()} threads)"
            )
            res = train_and_measure(cfg, args, seed, scene)
            entry = {
                "setting": name + args.label,
                "overrides": over,
                "seed": seed,
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "threads": torch.get_num_threads(),
                "machine": f"{os.cpu_count()} CPUs",
                "scene": dataclasses.asdict(scene),
                **res,
            }
            # Read again just before writing: several runs may share the file (one entry each).
            results = json.loads(out.read_text()) if out.is_file() else {}
            results[key] = entry
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            tmp.replace(out)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
