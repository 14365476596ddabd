"""The pictures evaluations draw (PNG; matplotlib, in the dev extra).

- save_figure(reconstruct(...)): LVMAE at work on one clip (the demo's PNG). Rows, for a few frames of the
  clip: the frames; the tokenizer's priority per token; what the encoder sees (hidden tokens greyed out);
  what the decoder reconstructs (the adaptive selection, in red); the tokenizer's decoding of the clip's
  true codes; and the same decoding with the model's predicted codes put in at the decoder-selected
  tokens, i.e. the clip as LVMAE reconstructs it.
- frame_grid: rows of per-frame images over a few frames (also the tokenizer evaluation's PNG).
- save_confusion, save_examples: a classifier's or probe's confusion matrix, and test clips with their true
  and predicted labels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lvmae.losses import predicted_codes
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.tokenizer import Tokenizer


def token_map(flags: torch.Tensor, grid: tuple[int, int, int], t: int, p: int) -> torch.Tensor:
    """(N,) per-token values -> (T, H, W) per pixel."""
    m = flags.reshape(grid).float()
    return m.repeat_interleave(t, 0).repeat_interleave(p, 1).repeat_interleave(p, 2)


Row = tuple[str, Callable[[int], torch.Tensor], dict]


def frame_grid(rows: list[Row], picks: list[int], title: str, path: str | Path, cell: float = 2.0) -> Path:
    """Draw one row per (label, frame index -> image, imshow options) over the frames `picks`, save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(rows), len(picks), figsize=(cell * len(picks), cell * len(rows)), squeeze=False
    )
    for r, (label, image, kwargs) in enumerate(rows):
        for c, f in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(image(f).numpy(), **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def reconstruct(
    model: MaskedVideoAutoencoder,
    tokenizer: Tokenizer,
    video: torch.Tensor,
    codes: torch.Tensor,
    priority: torch.Tensor,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """video (1, 3, T, H, W) in [0, 1]; codes, priority (1, T', H', W') -> per-pixel maps (T, H, W[, 3])."""
    model.eval()
    v = model.cfg.video
    plan = model.plan(1, torch.Generator().manual_seed(seed), priority)
    out = model(video, plan=plan)
    keep = plan.loss_weight()[0] > 0  # selected and encoder-masked: the tokens the loss saw
    ids = plan.ids_selected[0][keep]
    mixed = codes.reshape(1, -1).clone()
    mixed[0, ids] = predicted_codes(model.cfg, out.pred)[0][keep]
    t, p = v.tubelet_size, v.patch_size

    def rgb(x: torch.Tensor) -> torch.Tensor:
        return x[0].permute(1, 2, 3, 0).clamp(0, 1)  # (T, H, W, 3)

    flat_codes = codes.reshape(-1)
    return {
        "frames": rgb(video),
        "priority": token_map(priority.reshape(-1), v.grid, t, p),
        "visible": token_map(~plan.mask[0], v.grid, t, p),
        "selected": token_map(plan.selected[0], v.grid, t, p),
        "tokenizer": rgb(tokenizer.decode_codes(codes, priority)),
        "lvmae": rgb(tokenizer.decode_codes(mixed.view_as(codes), priority)),
        "code_accuracy": (mixed[0, ids] == flat_codes[ids]).float().mean().reshape(1),
    }


def save_figure(maps: dict[str, torch.Tensor], path: str | Path, title: str, columns: int = 4) -> Path:
    frames = maps["frames"]
    n = frames.shape[0]
    picks = [round(i * (n - 1) / max(columns - 1, 1)) for i in range(columns)]
    # One colour scale for the whole clip, stretched to its range: the ranking is what matters.
    prio = {"vmin": float(maps["priority"].min()), "vmax": float(maps["priority"].max())}
    rows = [
        ("clip", lambda f: frames[f], {}),
        ("priority", lambda f: maps["priority"][f], {"cmap": "magma", **prio}),
        ("encoder sees", lambda f: frames[f] * (0.25 + 0.75 * maps["visible"][f][..., None]), {}),
        ("decoder rebuilds", lambda f: tint(frames[f], maps["selected"][f]), {}),
        ("tokenizer (true codes)", lambda f: maps["tokenizer"][f], {}),
        ("LVMAE (predicted codes)", lambda f: maps["lvmae"][f], {}),
    ]
    return frame_grid(rows, picks, title, path, cell=2.2)


def tint(frame: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Selected pixels tinted red, the rest dimmed."""
    red = torch.tensor([1.0, 0.1, 0.1])
    sel = flags[..., None]
    return sel * (0.5 * frame + 0.5 * red) + (1 - sel) * 0.4 * frame


def save_confusion(s: dict[str, Any], classes: list[str], path: Path, results: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(s["confusion"]).float()
    share = m / m.sum(1, keepdim=True).clamp(min=1)
    side = 1.2 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j, i, int(m[i, j]), ha="center", va="center", color="black" if share[i, j] < 0.6 else "white"
            )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    kind = "random-init" if results["random_init"] else "pretrained"
    ax.set_title(f"{kind} encoder, test top-1 {100 * s['top1']:.0f}% ({s['num_clips']} clips)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def example_frames(clip: torch.Tensor, n: int = 8) -> list[int]:
    """n frame numbers of a clip (3, T, H, W), in time order: the frames that differ most from the clip's
    median frame (brief events), topped up with evenly spaced ones."""
    t = clip.shape[1]
    deviation = (clip - clip.median(dim=1, keepdim=True).values).abs().mean((0, 2, 3))  # (T,)
    picks: list[int] = []
    for f in deviation.argsort(descending=True).tolist():
        if len(picks) == n // 2:
            break
        if all(abs(f - p) > 2 for p in picks):  # one frame per event
            picks.append(f)
    for f in (round(i * (t - 1) / (n - 1)) for i in range(n)):
        if len(picks) < n and f not in picks:
            picks.append(f)
    return sorted(picks)


def save_examples(clips: list[torch.Tensor], names: list[tuple[str, str]], path: Path, results: dict) -> Path:
    """A row per test clip (3, T, H, W): eight of its frames (the most unusual ones and evenly spaced
    ones), with the true and predicted class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    fig, axes = plt.subplots(len(clips), cols, figsize=(1.4 * cols + 1.6, 1.55 * len(clips)), squeeze=False)
    for r, (clip, (true, pred)) in enumerate(zip(clips, names)):
        frames = clip.permute(1, 2, 3, 0).clamp(0, 1)  # (T, H, W, 3)
        for c, f in enumerate(example_frames(clip, cols)):
            ax = axes[r][c]
            ax.imshow(frames[f].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"frame {f}", fontsize=7)
        mark = "right" if true == pred else "WRONG"
        axes[r][0].set_ylabel(f"true: {true}\npredicted:\n{pred}\n({mark})", fontsize=7)
    kind = "random-init" if results["random_init"] else "pretrained"
    fig.suptitle(
        f"test clips, {kind} encoder probe (top-1 {100 * results['test']['top1']:.0f}%)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_eval_curve(evals: list[dict[str, Any]], path: Path, title: str) -> Path:
    """The in-run health probe over a run (train.health; the records of train_log.jsonl's "eval"): k-NN
    top-1 against chance, and the features' effective rank, by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in evals]
    fig, (acc, rank) = plt.subplots(1, 2, figsize=(9, 3.2))
    acc.plot(steps, [100 * e["knn_top1"] for e in evals], "o-", label="k-NN top-1")
    acc.axhline(100 * evals[0]["chance"], color="grey", ls="--", label="chance")
    acc.set(
        xlabel="step", ylabel="%", title=f"k-NN probe on {evals[0]['clips'][1]} {evals[0]['split']} clips"
    )
    acc.legend(fontsize=8)
    rank.plot(steps, [e["effective_rank"] for e in evals], "o-", color="tab:green")
    rank.set(xlabel="step", title=f"effective rank of the features (of {evals[0]['dim']})")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
