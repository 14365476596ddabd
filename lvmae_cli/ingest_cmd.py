"""`lvmae ingest clips|tokens|synth`: the argparse subcommands over ingest.clips, ingest.tokens and
ingest.synth (add_parser, which the main parser calls), and what they print."""

from __future__ import annotations

import argparse
import re
import sys

from ingest.config import IngestConfig
from ingest.metrics import metrics_exporter
from ingest.retry import StoreUnavailable
from lvmae_cli.ingest_args import add_clip_spec_args, clip_spec, storage_options

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1GiB', '512MB', '300k', '1048576' -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 64MiB, 500000)")
    unit = m.group(2).upper()
    return int(float(m.group(1)) * (1024 ** ("KMGT".index(unit) + 1) if unit else 1))


def _print_skipped(errors: list[dict], name, limit: int = 10) -> None:
    for e in errors[:limit]:
        print(f"  skipped {name(e)}: {e['reason']}: {e['detail']}")
    if len(errors) > limit:
        print(f"  ... and {len(errors) - limit} more (all in errors.jsonl)")


def _executor(args: argparse.Namespace) -> str:
    """--executor, checked: Ray importable when asked for, --ray-address only with it (ExecutorError)."""
    from ingest.ray_executor import ExecutorError, check_available

    if args.executor == "ray":
        check_available()
    elif args.ray_address is not None:
        raise ExecutorError("--ray-address is for --executor ray")
    return args.executor


def _add_executor_args(p: argparse.ArgumentParser, local: str, ray: str) -> None:
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help=f"local: {local} (default); ray: {ray} (pip install lvmae[ray])",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (auto, HOST:PORT); default: start a local Ray on 127.0.0.1",
    )


def cmd_clips(args: argparse.Namespace) -> int:
    from ingest.clips import IngestError, ingest_clips
    from ingest.labels import LabelError
    from ingest.ray_executor import ExecutorError
    from ingest.sources import SourceError
    from lvmae.errors import UserError

    cfg = IngestConfig(
        clip=clip_spec(args),
        shard_bytes=args.shard_size,
        shard_clips=args.shard_clips,
        workers=args.workers,
        num_nodes=args.num_nodes,
        node_rank=args.node_rank,
        strict=args.strict,
        split_seed=args.split_seed,
        val_share=args.val_share,
        test_share=args.test_share,
        storage_options=storage_options(args.storage_options) or {},
    )
    try:
        summary = ingest_clips(
            args.src,
            args.out,
            cfg,
            progress=not args.quiet,
            on_progress=metrics_exporter(args.metrics_port, args.metrics_addr),
            executor=_executor(args),
            ray_address=args.ray_address,
        )
    except (IngestError, SourceError, LabelError, ExecutorError) as err:
        raise UserError(str(err)) from None
    except StoreUnavailable as err:
        raise UserError(f"{err}; run the same command again once the store answers: it resumes") from None
    s = summary
    print(
        f"ingest: {s.sources} sources ({s.bad_sources} skipped, {s.too_short} too short for a clip), "
        f"{s.clips_planned} clips planned in {s.shards} shards; "
        f"this run wrote {s.samples_written} clips ({s.bytes_written / 1e6:.1f} MB, {s.clip_errors} clip errors, "
        f"{s.shards_skipped} shards already done) in {s.seconds:.1f} s"
    )
    _print_skipped(s.errors, lambda e: e["source"])
    notes = [
        f"{s.segments} manifest rows are segments of their files" if s.segments else "",
        f"{s.variable_rate} variable-rate sources sampled by presentation time" if s.variable_rate else "",
        f"{s.rotated} rotated sources turned upright" if s.rotated else "",
        "passed over: " + ", ".join(f"{n} {why}" for why, n in s.passed_over.items())
        if s.passed_over
        else "",
    ]
    for note in filter(None, notes):
        print(f"  {note}")
    if s.index_written:
        print(
            f"data set complete: {s.num_samples} clips, {args.out.rstrip('/')}/index.json (errors: errors.jsonl)"
        )
        counts = s.labels.get("counts", {})
        per_split = ", ".join(f"{split} {sum(c.values())}" for split, c in counts.items())
        classes = s.labels.get("classes", [])
        print(
            f"  splits by source video: {per_split} clips; "
            + (f"{len(classes)} classes: {', '.join(classes[:12])}" if classes else "no labels")
            + (" ..." if len(classes) > 12 else "")
        )
    else:
        print(
            "index.json not written yet: other nodes' shards are still missing; the last node to finish writes it"
        )
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    """Run a frozen tokenizer over a data set's clips -> DATASET/tokens/<tokenizer-id>/ (Zarr v3).

    Resumable per clip shard; bad clips are skipped and listed in errors.jsonl (unless --strict).
    """
    from ingest.ray_executor import ExecutorError
    from ingest.tokens import TokensError, ingest_tokens
    from lvmae.errors import UserError

    options = storage_options(args.storage_options)
    try:
        s = ingest_tokens(
            args.dataset,
            args.tokenizer,
            batch_size=args.batch_size,
            device=args.device,
            storage_options=options,
            progress=not args.quiet,
            workers=args.workers,
            strict=args.strict,
            executor=_executor(args),
            ray_address=args.ray_address,
        )
    except (TokensError, ExecutorError) as err:
        raise UserError(str(err)) from None
    except StoreUnavailable as err:
        raise UserError(f"{err}; run the same command again once the store answers: it resumes") from None
    print(
        f"tokens: {s.clips} clips tokenized, {s.skipped} skipped ({s.shards_skipped} of {s.shards} shards "
        f"already done) in {s.seconds:.1f} s on {s.device}"
    )
    _print_skipped(s.errors, lambda e: f"{e['key']} ({e['shard']})")
    print(f"token store complete: {s.store} ({s.num_valid} clips; errors: errors.jsonl)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a procedural long-temporal-context benchmark: OUT/videos/*.mp4 + OUT/manifest.csv.

    Resumable: videos already in OUT are kept. Feed the manifest to `lvmae ingest clips`.
    """
    from ingest.synth import task_table, write_benchmark
    from lvmae.errors import UserError

    if args.list:
        print("tasks (lvmae ingest synth OUT --task TASK --num N):")
        print(task_table())
        return 0
    if args.out is None or args.task is None or args.num is None:
        raise UserError("synth needs OUT, --task and --num (or --list to see the tasks)")
    try:
        manifest = write_benchmark(
            args.out,
            args.task,
            args.num,
            num_frames=args.frames,
            size=args.size,
            seed=args.seed,
            fps=args.fps,
            progress=not args.quiet,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"synth: {args.num} {args.task} videos ({args.frames} frames, {args.size}x{args.size}): {manifest}")
    print(f"next: lvmae ingest clips {manifest} --out DATA --frames {args.frames} --size {args.size}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    ingest = sub.add_parser("ingest", help="turn a video corpus into clip shards (and token stores)")
    isub = ingest.add_subparsers(dest="ingest_command", required=True, metavar="STAGE")
    p = isub.add_parser(
        "clips", help="videos -> WebDataset clip shards + index.json", description=cmd_clips.__doc__
    )
    p.add_argument(
        "src", nargs="+", help="directories, globs, files, s3:// prefixes, or .csv/.jsonl manifests"
    )
    p.add_argument("--out", required=True, help="data set root: a local path or s3://bucket/prefix")
    add_clip_spec_args(p)
    p.add_argument("--shard-size", type=parse_size, default=1 << 30, help="target shard size (default 1GiB)")
    p.add_argument(
        "--shard-clips", type=int, default=None, help="exact clips per shard (overrides --shard-size)"
    )
    p.add_argument("--workers", type=int, default=1, help="parallel shard writers on this machine")
    _add_executor_args(p, "--workers processes on this machine", "a Ray task per shard")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="fail on the first bad file instead of skipping it")
    p.add_argument(
        "--val-share",
        type=float,
        default=0.1,
        help="share of source videos (per label) for val (default 0.1)",
    )
    p.add_argument(
        "--test-share",
        type=float,
        default=0.1,
        help="share of source videos (per label) for test (default 0.1)",
    )
    p.add_argument(
        "--split-seed", type=int, default=0, help="seed of the split draw (a manifest's split column wins)"
    )
    p.add_argument(
        "--storage-options", default=None, help="JSON fsspec options (credentials: use the environment)"
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-addr", default="127.0.0.1")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_clips)

    t = isub.add_parser(
        "tokens",
        help="clip shards -> the frozen tokenizer's codes and priorities (Zarr v3 token store)",
        description=cmd_tokens.__doc__,
    )
    t.add_argument("dataset", help="data set root written by `lvmae ingest clips` (local path or s3://)")
    t.add_argument(
        "--tokenizer", required=True, help="directory of a saved tokenizer (lvmae train tokenizer)"
    )
    t.add_argument("--batch-size", type=int, default=8, help="clips per tokenizer forward pass (default 8)")
    t.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    t.add_argument("--workers", type=int, default=1, help="threads decoding clips ahead of the tokenizer")
    _add_executor_args(t, "this process", "Ray actors holding the tokenizer, a shard at a time")
    t.add_argument("--strict", action="store_true", help="fail on the first bad clip instead of skipping it")
    t.add_argument(
        "--storage-options", default=None, help="JSON fsspec options (credentials: use the environment)"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tokens)

    from ingest.synth import TASKS, task_table

    y = isub.add_parser(
        "synth",
        help="write a procedural long-temporal-context benchmark (videos + manifest.csv)",
        description=cmd_synth.__doc__,
        epilog="tasks:\n" + task_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    y.add_argument("out", nargs="?", default=None, help="output directory (videos/ and manifest.csv)")
    y.add_argument("--task", choices=list(TASKS), default=None, help="which benchmark task (see below)")
    y.add_argument("--num", type=int, default=None, help="number of videos (classes balanced)")
    y.add_argument("--frames", type=int, default=128, help="frames per video (default 128)")
    y.add_argument("--size", type=int, default=32, help="frame side in pixels, even, >= 16 (default 32)")
    y.add_argument("--seed", type=int, default=0, help="seed of labels and content (default 0)")
    y.add_argument("--fps", type=int, default=25, help="frame rate written in the videos (default 25)")
    y.add_argument("--list", action="store_true", help="list the tasks and their classes, then exit")
    y.add_argument("--quiet", action="store_true", help="no progress bar")
    y.set_defaults(func=cmd_synth)

    from lvmae_cli import manifest_cmd, survey_cmd

    manifest_cmd.add_parser(isub)
    survey_cmd.add_parser(isub)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: lvmae ingest ...")
