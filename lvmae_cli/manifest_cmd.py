"""`lvmae ingest manifest`: a benchmark's own annotation files -> the manifest CSV `lvmae ingest clips`
reads (ingest.benchmarks), and the one summary line it prints."""

from __future__ import annotations

import argparse
import inspect


def cmd_manifest(args: argparse.Namespace) -> int:
    """Convert a video benchmark's annotation files into a manifest CSV (path, label, split, segment).

    Videos the annotations name but ROOT lacks are left out, counted and listed in <out stem>.missing.csv.
    Then: lvmae ingest clips MANIFEST --out DATA.
    """
    from ingest.benchmarks import AnnotationError, build_manifest
    from lvmae.errors import UserError

    try:
        summary = build_manifest(
            args.format, args.annotations, args.videos, args.out, label=args.label, fold=args.fold
        )
    except AnnotationError as err:
        raise UserError(str(err)) from None
    print(summary.line())
    return 0


def add_parser(isub: argparse._SubParsersAction) -> None:
    """Add the `manifest` stage to the `lvmae ingest` subparsers."""
    from ingest.benchmarks import format_table

    p = isub.add_parser(
        "manifest",
        help="benchmark annotation files (Kinetics, SSv2, Diving48, EPIC-Kitchens-100, UCF101, HMDB51) -> manifest.csv",
        description=inspect.cleandoc(cmd_manifest.__doc__ or ""),
        epilog="formats (FORMAT: annotation files; videos under ROOT):\n" + format_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", metavar="FORMAT", help="which benchmark's annotation layout (see below)")
    p.add_argument(
        "annotations", nargs="+", metavar="ANNOTATIONS", help="annotation files, or folders holding them"
    )
    p.add_argument(
        "--videos", required=True, metavar="ROOT", help="folder the videos are under (searched recursively)"
    )
    p.add_argument("--out", required=True, help="the manifest CSV to write (path relative to its folder)")
    p.add_argument(
        "--label",
        default=None,
        metavar="verb|noun|action",
        help="epic-kitchens-100: the label (default action)",
    )
    p.add_argument(
        "--fold", type=int, default=None, metavar="N", help="ucf101, hmdb51: split 1, 2 or 3 (default 1)"
    )
    p.set_defaults(func=cmd_manifest)
