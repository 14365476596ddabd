"""`lvmae ingest survey`: probe a corpus and print (and write as JSON) what it holds and what `ingest clips`
with the same clip spec would make of it (ingest.survey)."""

from __future__ import annotations

import argparse
import inspect
import json

from ingest.retry import StoreUnavailable
from lvmae_cli.ingest_args import add_clip_spec_args, clip_spec, storage_options


def cmd_survey(args: argparse.Namespace) -> int:
    """Survey a corpus before ingesting it: containers, codecs, colour, rotation, rates, durations and sizes;
    the clips the clip spec gives (per split and label); what would be skipped and why; the output size and
    the ingest time, from one real clip cut and timed (--no-measure: none).

    Probes every file once (no decoding beyond each file's first frame) on max(4, --workers) threads.
    """
    from ingest.labels import LabelError
    from ingest.sources import SourceError
    from ingest.survey import format_report, survey
    from lvmae.errors import UserError

    try:
        report = survey(
            args.src,
            clip_spec(args),
            workers=args.workers,
            storage_options=storage_options(args.storage_options),
            measure=args.measure,
            split_seed=args.split_seed,
            val_share=args.val_share,
            test_share=args.test_share,
            progress=not args.quiet,
        )
    except (SourceError, LabelError) as err:
        raise UserError(str(err)) from None
    except StoreUnavailable as err:
        raise UserError(f"{err}; run the survey again once the store answers") from None
    print(format_report(report))
    if args.json:
        from lvmae.weights import write_text_atomically  # (imports torch: only when asked to write)

        write_text_atomically(args.json, json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}")
    return 0


def add_parser(isub: argparse._SubParsersAction) -> None:
    """Add the `survey` stage to the `lvmae ingest` subparsers."""
    p = isub.add_parser(
        "survey",
        help="probe a corpus: what it holds, the clips a spec gives, what is skipped, size and time",
        description=inspect.cleandoc(cmd_survey.__doc__ or ""),
    )
    p.add_argument(
        "src", nargs="+", help="directories, globs, files, s3:// prefixes, or .csv/.jsonl manifests"
    )
    p.add_argument(
        "--json", default=None, metavar="OUT.json", help="also write the report as JSON (atomically)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="the `ingest clips --workers` the time estimate assumes (probing uses max(4, N) threads)",
    )
    add_clip_spec_args(p)
    p.add_argument("--val-share", type=float, default=0.1, help="as ingest clips (default 0.1)")
    p.add_argument("--test-share", type=float, default=0.1, help="as ingest clips (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="as ingest clips (default 0)")
    p.add_argument(
        "--no-measure",
        dest="measure",
        action="store_false",
        help="cut no clip: no time estimate, the size from 0.2 bits a pixel",
    )
    p.add_argument(
        "--storage-options", default=None, help="JSON fsspec options (credentials: use the environment)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_survey)
