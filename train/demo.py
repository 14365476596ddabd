"""`make demo`: the pipeline end to end on the embedded default (local store, real videos, CPU).

1. `lvmae ingest clips`: the four real sample videos -> VP9 clip shards + index.json in --out/data.
2. Fit a tiny FSQ-MagViT tokenizer with its token scorer on the clips read back from the shards.
3. `lvmae ingest tokens`: codes and priorities for every clip into the Zarr token store.
4. Pretrain a tiny LVMAE: adaptive decoder masking (15% of tokens, top priority), token targets.

Until the streaming DALI loader and DeepSpeed trainer land, steps 2 and 4 run in this process on
the whole (small) data set in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import save_file
from tqdm import tqdm

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.decode import decode_clip, to_model_input
from ingest.samples import sample_videos
from ingest.storage import Store
from ingest.tokens import ingest_tokens, open_tokens
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
        for step in bar:
            losses.append(step_fn(step))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def read_dataset(root: Path) -> tuple[list[str], np.ndarray]:
    """Every clip of a local data set: (keys, (N, T, H, W, 3) uint8), decoded as training will."""
    index = json.loads((root / "index.json").read_text())
    frames = index["clip_spec"]["num_frames"]
    keys, clips = [], []
    for shard in index["shards"]:
        for sample in wds.WebDataset(str(root / shard["name"]), shardshuffle=False):
            keys.append(sample["__key__"])
            clips.append(decode_clip(sample[index["clip_spec"]["extension"]], frames))
    return keys, np.stack(clips)


def head_tail(xs: list[float]) -> tuple[float, float]:
    n = max(1, len(xs) // 10)
    return round(sum(xs[:n]) / n, 4), round(sum(xs[-n:]) / n, 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer-steps", type=int, default=120)
    parser.add_argument("--mae-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    # 1. Ingest (resumable: a re-run skips what is done).
    data = out / "data"
    spec = ClipSpec(num_frames=args.frames, size=args.size)
    ingest = ingest_clips(
        [str(p) for p in sample_videos().values()], str(data), IngestConfig(clip=spec, shard_clips=8)
    )
    keys, clips = read_dataset(data)
    print(
        f"ingest: {ingest.num_samples} clips of {args.frames}x{args.size}x{args.size} in {ingest.shards} shards -> {data}"
    )

    # 2. Tokenizer: learns codes and per-token priority jointly.
    video = VideoSpec(num_frames=args.frames, img_size=args.size)
    tok_cfg = TokenizerConfig(
        video=video, base_channels=8, num_groups=4, fsq_levels=[8, 5, 5, 5], keep_ratio=0.25
    )
    tokenizer = Tokenizer(tok_cfg)
    opt = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(args.seed)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(keys), generator=gen)[: args.batch_size]
        return idx, to_model_input(clips[idx.numpy()])

    def tokenizer_step(step: int) -> float:
        _, x = batch(step)
        loss, parts = tokenizer_loss(tokenizer(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(parts["recon"])

    tok_losses = fit("tokenizer", args.tokenizer_steps, tokenizer_step)
    tid = save_tokenizer(tokenizer, out / "tokenizer")

    # 3. Token store: the frozen tokenizer over every clip, into Zarr.
    tokens = ingest_tokens(str(data), str(out / "tokenizer"), progress=False)
    group = open_tokens(Store(str(data)), f"tokens/{tid}")
    row = {str(k): i for i, k in enumerate(group["keys"][:]) if k}
    rows = [row[k] for k in keys]
    codes = torch.from_numpy(group["codes"][:][rows].astype(np.int64))
    priority = torch.from_numpy(group["priority"][:][rows].astype(np.float32))
    print(f"tokens: {tokens.num_valid} clips -> {tokens.store} (grid {tuple(codes.shape[1:])})")

    # 4. LVMAE: the decoder reconstructs only the top-priority 15% of tokens, with token targets.
    mae_cfg = MAEConfig(
        preset="tiny",
        video=video,
        masking=MaskingConfig(encoder="tube", encoder_ratio=0.9, decoder="adaptive", decoder_budget=0.15),
        target=TargetConfig(kind="tokens", token_loss="factorized", fsq_levels=list(tok_cfg.fsq_levels)),
    ).resolved()
    check_tokenizer_matches(mae_cfg, tok_cfg)
    model = MaskedVideoAutoencoder(mae_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def mae_step(step: int) -> float:
        idx, x = batch(step)
        loss = mae_loss(model.cfg, model(x, priority=priority[idx], generator=gen), codes=codes[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    mae_losses = fit("lvmae", args.mae_steps, mae_step)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "mae.safetensors")
    (out / "mae.yaml").write_text(to_yaml(model.cfg))

    summary = {
        "clips": ingest.num_samples,
        "tokenizer_id": tid,
        "tokenizer_recon_mse_first_last": head_tail(tok_losses),
        "mae_token_loss_first_last": head_tail(mae_losses),
        "tokens_per_clip": video.num_tokens,
        "decoded_tokens_per_clip": round(0.15 * video.num_tokens),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    t0, t1 = summary["tokenizer_recon_mse_first_last"]
    m0, m1 = summary["mae_token_loss_first_last"]
    print(f"tokenizer {tid}: reconstruction MSE {t0:.4f} -> {t1:.4f}")
    print(f"LVMAE (adaptive decoder mask, 15% of tokens, token targets): loss {m0:.3f} -> {m1:.3f}")
    print(
        f"artefacts in {out}/: data/ (shards, index, tokens), tokenizer/, mae.safetensors, mae.yaml, summary.json"
    )
    print(f"done in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
