"""`lvmae eval tokenizer CKPT DATASET`: how well a trained tokenizer rebuilds clips, how it uses its
codebook, and what its priority picks; a JSON of figures and a PNG.

    lvmae eval tokenizer runs/tokenizer/tokenizer demo-out/data --clips 64 --out runs/tokenizer/eval

CKPT is an exported tokenizer (RUN/tokenizer: config.json + model.safetensors) or the run folder holding
it. The clips stream through the training loader (the same decode), in data set order. Figures (see
lvmae.diagnostics): PSNR and SSIM of the reconstruction at the tokenizer's keep_ratio (what training
optimised) and with every token; codebook use (share of codes used, perplexity); and the priority's
saturation share, entropy, share of top-15% tokens per time step, and rank correlation with the frame
difference, with the lift of its top tokens on the tokens whose frame difference is in the clip's top 15%.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from evals.figures import frame_grid, tint, token_map
from lvmae import diagnostics as dg
from lvmae.errors import UserError
from lvmae.tokenizer import CONFIG_FILE, Tokenizer, load_tokenizer
from lvmae.weights import write_text_atomically

TOP = 0.15  # the share of tokens the LVMAE decoder reconstructs: the priority's top is what matters


def find_tokenizer(path: str | Path) -> Path:
    """An exported tokenizer folder, given it or the run folder above it."""
    p = Path(path)
    for d in (p, p / "tokenizer"):
        if (d / CONFIG_FILE).is_file():
            return d
    raise UserError(
        f"{p} is not a trained tokenizer: give RUN/tokenizer (config.json + model.safetensors, written at "
        "the end of `lvmae train tokenizer`) or the run folder holding it"
    )


@torch.no_grad()
def evaluate_tokenizer(
    model: Tokenizer,
    batches: Any,
    max_clips: int,
    device: str = "cpu",
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run `model` over batches {"video" (B, 3, T, H, W) in [0, 1], "keys"} until max_clips clips;
    -> (figures, the first clip's tensors for the figure)."""
    model.eval().to(device)
    cfg, v = model.cfg, model.cfg.video
    sums: dict[str, list[torch.Tensor]] = {k: [] for k in ("psnr", "ssim", "psnr_all", "ssim_all")}
    codes_all, prio_all, fd_all = [], [], []
    first: dict[str, torch.Tensor] = {}
    seen, started = 0, time.perf_counter()
    for batch in batches:
        video = batch["video"][: max_clips - seen].to(device, torch.float32)
        codes, prio = model.encode(video)
        recon = model.decode_codes(codes, prio)
        full = model.decode_codes(codes, prio, keep_ratio=1.0)
        sums["psnr"].append(dg.psnr(recon, video).cpu())
        sums["ssim"].append(dg.ssim(recon, video).cpu())
        sums["psnr_all"].append(dg.psnr(full, video).cpu())
        sums["ssim_all"].append(dg.ssim(full, video).cpu())
        codes_all.append(codes.cpu())
        prio_all.append(prio.cpu())
        fd_all.append(dg.frame_difference(video, v.tubelet_size, v.patch_size).cpu())
        if not first:
            first = {
                "video": video[:1].cpu(),
                "recon": recon[:1].cpu(),
                "priority": prio[:1].cpu(),
                "keep": model.select(prio[:1]).cpu(),
                "frame_diff": fd_all[-1][:1],
                "key": batch["keys"][0],
            }
        seen += video.shape[0]
        if seen >= max_clips:
            break
    if not seen:
        raise UserError("no clips to evaluate: the data set yielded none")
    prio, fd = torch.cat(prio_all), torch.cat(fd_all)
    mean = {k: round(float(torch.cat(x).mean()), 4) for k, x in sums.items()}
    figures = {
        "clips": seen,
        "seconds": round(time.perf_counter() - started, 2),
        "keep_ratio": cfg.keep_ratio,
        "psnr_db": mean["psnr"],
        "ssim": mean["ssim"],
        "psnr_db_all_tokens": mean["psnr_all"],
        "ssim_all_tokens": mean["ssim_all"],
        "codebook_size": cfg.codebook_size,
        **{k: round(x, 4) for k, x in dg.codebook_usage(torch.cat(codes_all), cfg.codebook_size).items()},
        "priority": {
            **dg.priority_diagnostics(prio, fd, TOP),
            # No ground truth of what changes in real clips: the tokens with the most frame difference
            # stand in for it, so this lift says how far the priority agrees with plain motion.
            "lift_on_top_frame_diff": round(dg.lift(prio, dg.top_mask(fd, TOP), TOP), 3),
        },
    }
    return figures, first


def save_tokenizer_figure(first: dict[str, Any], model: Tokenizer, path: Path, title: str) -> Path:
    """Rows over a few frames: the clip, its reconstruction, the priority heat map (one colour scale for
    the clip), the kept tokens (red), and the frame difference per token."""
    v = model.cfg.video
    t, p = v.tubelet_size, v.patch_size

    def per_pixel(x: torch.Tensor) -> torch.Tensor:  # (1, T', H', W') -> (T, H, W)
        return token_map(x.reshape(-1), v.grid, t, p)

    frames = first["video"][0].permute(1, 2, 3, 0)
    recon = first["recon"][0].permute(1, 2, 3, 0).clamp(0, 1)
    prio, keep, fd = per_pixel(first["priority"]), per_pixel(first["keep"]), per_pixel(first["frame_diff"])
    n, columns = frames.shape[0], 6
    picks = [round(i * (n - 1) / (columns - 1)) for i in range(columns)]
    rows = [
        ("clip", lambda f: frames[f], {}),
        ("reconstruction", lambda f: recon[f], {}),
        (
            "priority",
            lambda f: prio[f],
            {"cmap": "magma", "vmin": float(prio.min()), "vmax": float(prio.max())},
        ),
        (
            f"kept ({100 * model.cfg.keep_ratio:.0f}%)",
            lambda f: tint(frames[f], keep[f]),
            {},
        ),
        (
            "frame difference",
            lambda f: fd[f],
            {"cmap": "viridis", "vmin": 0.0, "vmax": float(fd.max()) or 1.0},
        ),
    ]
    return frame_grid(rows, picks, title, path)


def run_eval_tokenizer(
    ckpt: str,
    dataset: str,
    out: str | None = None,
    clips: int = 64,
    batch_size: int = 4,
    device: str = "auto",
    decoder: str = "auto",
) -> dict[str, Any]:
    """The command: load, evaluate, write OUT/tokenizer_eval.json and OUT/tokenizer_eval.png."""
    from train.loader import ClipLoader, LoaderError

    directory = find_tokenizer(ckpt)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = load_tokenizer(directory, device=device)
    except ValueError as err:
        raise UserError(str(err)) from None
    try:
        loader = ClipLoader(dataset, batch_size, shuffle_buffer=0, epochs=1, decoder=decoder)
    except LoaderError as err:
        raise UserError(str(err)) from None
    v = model.cfg.video
    if (loader.spec["num_frames"], loader.spec["size"]) != (v.num_frames, v.img_size):
        raise UserError(
            f"tokenizer {directory} takes {v.num_frames}-frame {v.img_size} px clips; {dataset} holds "
            f"{loader.spec['num_frames']}-frame {loader.spec['size']} px clips"
        )
    figures, first = evaluate_tokenizer(model, loader, clips, device)
    tid = json.loads((directory / CONFIG_FILE).read_text()).get("tokenizer_id")
    figures = {"tokenizer": str(directory), "tokenizer_id": tid, "dataset": dataset, **figures}
    target = Path(out) if out else directory.parent / "eval"
    target.mkdir(parents=True, exist_ok=True)
    write_text_atomically(target / "tokenizer_eval.json", json.dumps(figures, indent=1) + "\n")
    title = (
        f"{tid}, clip {first['key']}: PSNR {figures['psnr_db']:.1f} dB with "
        f"{100 * model.cfg.keep_ratio:.0f}% of tokens"
    )
    figures["figure"] = str(save_tokenizer_figure(first, model, target / "tokenizer_eval.png", title))
    figures["json"] = str(target / "tokenizer_eval.json")
    return figures


def summary_lines(f: dict[str, Any]) -> list[str]:
    """The figures a person reads first, as lines of text."""
    pr = f["priority"]
    per_t = " ".join(f"{x:.2f}" for x in pr["top_share_per_time"])
    return [
        f"reconstruction: PSNR {f['psnr_db']:.2f} dB, SSIM {f['ssim']:.3f} with {100 * f['keep_ratio']:.0f}% "
        f"of tokens kept; {f['psnr_db_all_tokens']:.2f} dB, SSIM {f['ssim_all_tokens']:.3f} with all",
        f"codebook: {100 * f['used_share']:.1f}% of {f['codebook_size']} codes used, perplexity "
        f"{f['perplexity']:.1f}",
        f"priority: rank correlation with frame difference {pr['frame_diff_spearman']:.2f}, lift of its top "
        f"15% on the top-15% frame difference {pr['lift_on_top_frame_diff']:.2f} (1 = chance), entropy "
        f"{pr['entropy']:.2f}, saturated {100 * pr['saturation_share']:.1f}%",
        f"priority: share of top-15% tokens per time step: {per_t}",
    ]
