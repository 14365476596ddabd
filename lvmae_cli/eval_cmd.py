"""`lvmae eval tokenizer|probe`: score a trained model (evals/).

lvmae eval tokenizer RUN/tokenizer DATA [--clips 64]          # reconstruction, codebook, priority
lvmae eval probe RUN/export DATA [--frames 32 --views 4x1]     # attentive probe on the frozen encoder
"""

from __future__ import annotations

import argparse
from typing import Any

from lvmae.errors import UserError


def cmd_eval_tokenizer(args: argparse.Namespace) -> int:
    from evals.tokenizer_eval import run_eval_tokenizer, summary_lines

    if args.clips < 1 or args.batch_size < 1:
        raise UserError("--clips and --batch-size must be at least 1")
    figures = run_eval_tokenizer(
        args.ckpt,
        args.dataset,
        out=args.out,
        clips=args.clips,
        batch_size=args.batch_size,
        device=args.device,
        decoder=args.decoder,
    )
    print(f"lvmae eval tokenizer: {figures['tokenizer_id']} on {figures['clips']} clips of {args.dataset}")
    for line in summary_lines(figures):
        print(f"  {line}")
    print(f"  figures: {figures['json']}\n  picture: {figures['figure']}")
    return 0


def cmd_eval_probe(args: argparse.Namespace) -> int:
    from evals.probe import ProbeConfig, run_probe, summary_line

    try:
        temporal, spatial = (int(x) for x in args.views.lower().split("x"))
    except ValueError:
        raise UserError(f"--views {args.views!r}: expected TEMPORALxSPATIAL, e.g. 4x1") from None
    cfg = ProbeConfig(
        frames=args.frames,
        size=args.size,
        temporal_views=temporal,
        spatial_views=spatial,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        random_init=args.random_init,
        feature_norm=args.feature_norm,
        decoder=args.decoder,
    )
    results = run_probe(args.source, args.dataset, cfg, out=args.out)
    print(f"lvmae eval probe: {results['source']} on {args.dataset}")
    print(f"  {summary_line(results)}")
    print(f"  figures: {results['json']}\n  confusion: {results['confusion_png']}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model", description="Evaluate a trained model.")
    kinds = p.add_subparsers(dest="eval_kind", required=True, metavar="KIND")
    t = kinds.add_parser(
        "tokenizer",
        help="reconstruction, codebook use and priority diagnostics of a trained tokenizer",
        description="Reconstruction PSNR and SSIM, codebook use and priority diagnostics of a trained "
        "tokenizer on a clip data set: OUT/tokenizer_eval.json and OUT/tokenizer_eval.png (docs/tokenizer.md).",
    )
    t.add_argument("ckpt", metavar="CKPT", help="RUN/tokenizer (or the run folder holding it)")
    t.add_argument("dataset", metavar="DATASET", help="clip data set root: a local path or s3://...")
    t.add_argument("--out", help="output folder (default: eval/ beside the tokenizer folder, i.e. RUN/eval)")
    t.add_argument("--clips", type=int, default=64, help="clips to evaluate, in data set order (default 64)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--device", default="auto", help="auto (CUDA where available), cpu or cuda")
    t.add_argument("--decoder", choices=("auto", "dali", "pyav"), default="auto", help="clip decoder")
    t.set_defaults(func=cmd_eval_tokenizer)

    p = kinds.add_parser(
        "probe",
        help="attentive probe on a frozen encoder: top-1/top-5, per class, confusion (train/val/test splits)",
        description="Train an attentive probe on the frozen encoder's features of the data set's train split "
        "and score it on val and test (splits made by source video at ingest). SOURCE: RUN/export, a run "
        "folder or a checkpoint folder. Writes probe.json, confusion.png and examples.png.",
    )
    p.add_argument("source", help="exported model (RUN/export), run folder, or checkpoint folder (step-N)")
    p.add_argument("dataset", help="labelled data set root (lvmae ingest clips MANIFEST with a label column)")
    p.add_argument("--out", default=None, help="output folder (default: probe-out)")
    p.add_argument(
        "--frames", type=int, default=None, help="clip length the encoder runs on (default: its own)"
    )
    p.add_argument("--size", type=int, default=None, help="clip side the encoder runs on (default: its own)")
    p.add_argument(
        "--views", default="1x1", help="TEMPORALxSPATIAL views per clip, logits averaged (default 1x1)"
    )
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-init", action="store_true", help="probe an untrained encoder of the same shape")
    p.add_argument(
        "--feature-norm",
        choices=("channel", "none"),
        default="channel",
        help="standardize feature channels with training statistics (default) or probe raw tokens",
    )
    p.add_argument("--decoder", choices=("auto", "dali", "pyav"), default="auto", help="clip decoder")
    p.set_defaults(func=cmd_eval_probe)
