"""Options that several `lvmae ingest` stages take, defined once: the clip spec (`ingest clips`, `ingest
survey`) and --storage-options."""

from __future__ import annotations

import argparse
import json

from ingest.config import ClipSpec


def add_clip_spec_args(p: argparse.ArgumentParser) -> None:
    """--frames --size --fps --frame-stride --clip-stride --codec (read back by clip_spec)."""
    p.add_argument("--frames", type=int, default=128, help="frames per clip (default 128)")
    p.add_argument("--size", type=int, default=224, help="clip side after short-side resize + centre crop")
    p.add_argument("--fps", type=float, default=None, help="target frame rate (default: the source's)")
    p.add_argument(
        "--frame-stride", type=int, default=1, help="source frames per clip frame when --fps is unset"
    )
    p.add_argument(
        "--clip-stride", type=int, default=None, help="clip frames between clip starts (default: --frames)"
    )
    p.add_argument("--codec", choices=["vp9", "h264"], default="vp9")


def clip_spec(args: argparse.Namespace) -> ClipSpec:
    return ClipSpec(
        num_frames=args.frames,
        size=args.size,
        fps=args.fps,
        frame_stride=args.frame_stride,
        clip_stride=args.clip_stride,
        codec=args.codec,
    )


def storage_options(text: str | None) -> dict | None:
    """--storage-options: JSON fsspec options, or None."""
    from lvmae.errors import UserError

    try:
        return json.loads(text) if text else None
    except ValueError as err:
        raise UserError(f"--storage-options is not JSON: {err}") from None
