"""`make demo` until the streaming pipeline lands: the method end to end on real clips, in memory.

Fits a tiny FSQ-MagViT tokenizer with its token scorer on the four real sample videos, encodes them into
codes and priorities, then pretrains a tiny LVMAE with adaptive decoder masking on token targets. Prints
the losses and writes the tokenizer, the MAE weights (safetensors) and a summary into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ingest.frames import load_clip
from ingest.samples import sample_videos
from lvmae.config import (
    MAEConfig,
    MaskingConfig,
    TargetConfig,
    TokenizerConfig,
    VideoSpec,
    check_tokenizer_matches,
    to_yaml,
)
from lvmae.losses import mae_loss
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.tokenizer import Tokenizer, save_tokenizer, tokenizer_loss


def fit(name: str, steps: int, step_fn) -> list[float]:
    losses = []
    with tqdm(range(steps), desc=name, unit="step", file=sys.stdout) as bar:
        for _ in bar:
            losses.append(step_fn())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tokenizer-steps", type=int, default=100)
    parser.add_argument("--mae-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    videos = sample_videos()
    clips = torch.stack([load_clip(path, args.frames, args.size) for path in videos.values()])
    print(f"{len(videos)} real clips ({', '.join(videos)}): {tuple(clips.shape)} (B, C, T, H, W)")
    video = VideoSpec(num_frames=args.frames, img_size=args.size)

    tok_cfg = TokenizerConfig(
        video=video, base_channels=8, num_groups=4, fsq_levels=[8, 5, 5, 5], keep_ratio=0.25
    )
    tokenizer = Tokenizer(tok_cfg)
    opt = torch.optim.Adam(tokenizer.parameters(), lr=2e-3)

    def tokenizer_step() -> float:
        loss, parts = tokenizer_loss(tokenizer(clips), clips)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(parts["recon"])

    tok_losses = fit("tokenizer", args.tokenizer_steps, tokenizer_step)
    tid = save_tokenizer(tokenizer, out / "tokenizer")
    codes, priority = tokenizer.encode(clips)

    mae_cfg = MAEConfig(
        preset="tiny",
        video=video,
        masking=MaskingConfig(encoder="tube", encoder_ratio=0.9, decoder="adaptive", decoder_budget=0.15),
        target=TargetConfig(kind="tokens", token_loss="factorized", fsq_levels=list(tok_cfg.fsq_levels)),
    ).resolved()
    check_tokenizer_matches(mae_cfg, tok_cfg)
    model = MaskedVideoAutoencoder(mae_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)

    def mae_step() -> float:
        loss = mae_loss(model.cfg, model(clips, priority=priority, generator=gen), codes=codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    mae_losses = fit("lvmae", args.mae_steps, mae_step)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "mae.safetensors")
    (out / "mae.yaml").write_text(to_yaml(model.cfg))

    def head_tail(xs: list[float]) -> tuple[float, float]:
        n = max(1, len(xs) // 10)
        return sum(xs[:n]) / n, sum(xs[-n:]) / n

    summary = {
        "clips": list(videos),
        "tokenizer_id": tid,
        "tokenizer_recon_mse": head_tail(tok_losses),
        "mae_token_loss": head_tail(mae_losses),
        "tokens_per_clip": mae_cfg.video.num_tokens,
        "decoded_tokens_per_clip": round(0.15 * mae_cfg.video.num_tokens),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    t0, t1 = summary["tokenizer_recon_mse"]
    m0, m1 = summary["mae_token_loss"]
    print(f"tokenizer {tid}: reconstruction MSE {t0:.4f} -> {t1:.4f}")
    print(f"LVMAE (adaptive decoder mask, 15% of tokens, token targets): loss {m0:.3f} -> {m1:.3f}")
    print(
        f"artefacts in {out}/: tokenizer/, mae.safetensors, mae.yaml, summary.json ({summary['seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
