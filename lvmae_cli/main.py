"""The `lvmae` command line: the parser built from one module per command group, and its error handling.

    lvmae info | ingest clips|tokens|synth | train mae|tokenizer|finetune | finetune | launch
               | eval tokenizer|probe | export hf | import | plan

Errors a user can cause (lvmae.errors.UserError, lvmae.config.ConfigError) are one line on stderr and exit
status 2; anything else is a bug and keeps its traceback. `python -m lvmae_cli` is the same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lvmae.config import ConfigError
from lvmae.errors import UserError
from lvmae_cli import eval_cmd, info_cmd, launch_cmd, plan_cmd, train_cmd, weights_cmd
from lvmae_cli.ingest_cmd import add_parser as add_ingest

# Each command group adds its subcommands, in the order `lvmae --help` lists them.
COMMAND_GROUPS = (
    info_cmd.add_parser,
    add_ingest,
    train_cmd.add_parser,
    launch_cmd.add_parser,
    eval_cmd.add_parser,
    weights_cmd.add_parser,
    plan_cmd.add_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvmae", description="Long-video masked autoencoders: ingest, train, monitor."
    )
    # The deepspeed launcher puts --local_rank=N before the rank's arguments unless given --no_local_rank
    # (`lvmae launch` gives it); the rank reads LOCAL_RANK from its environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


def exit_now(code: int) -> None:
    """Exit after the exit hooks, without the interpreter's teardown: for a run that stops because its
    store is gone, whose reads still in flight (zarr's event loop, s3fs) would otherwise be torn down
    with a page of "Task was destroyed" tracebacks under its one-line error; and for every
    `python -m lvmae_cli` (lvmae_cli/__main__.py), whose teardown only costs time. Files must be closed
    by then (they are: every writer closes its own)."""
    import atexit
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    run_exit_hooks = getattr(atexit, "_run_exitfuncs", None)  # CPython: what a normal exit runs first
    if run_exit_hooks is not None:
        run_exit_hooks()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError) as err:
        code = err.exit_code if isinstance(err, UserError) else 2  # 75: preempted, requeue (train.preempt)
        print(f"lvmae {args.command}: {'error' if code == 2 else 'stopped'}: {err}", file=sys.stderr)
        if isinstance(err, UserError) and err.abandon_in_flight:
            exit_now(code)
        return code
    except KeyboardInterrupt:
        print(f"lvmae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
