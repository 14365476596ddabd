"""`lvmae train mae|tokenizer|finetune` and `lvmae finetune`: one rank of a training run (several: `lvmae
launch`, lvmae_cli.launch_cmd).

    lvmae train mae configs/demo_cpu.yaml data.tokens=fsq-... [--resume auto]      # one process
    lvmae finetune configs/finetune_demo_cpu.yaml finetune.init_from=RUN/export     # = train finetune

Arguments after the subcommand are recipes (*.yaml, merged in order) and dotted overrides (key=value).
What each KIND trains is the table TASKS (a task of train.tasks or evals.finetune).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lvmae.errors import UserError


def split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """-> (recipe paths, dotted overrides). A recipe that does not exist is a user error."""
    recipes, overrides = [], []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif item.endswith((".yaml", ".yml")):
            if not Path(item).is_file():
                raise UserError(f"no recipe {item}")
            recipes.append(item)
        else:
            raise UserError(f"{item!r} is neither a recipe (*.yaml) nor an override (key=value)")
    return recipes, overrides


def _mae(recipes: list[str], overrides: list[str]) -> tuple[Any, Any]:
    from train.config import load_train_config
    from train.tasks import MAETask

    cfg = load_train_config(recipes, overrides)
    return MAETask(cfg), cfg


def _tokenizer(recipes: list[str], overrides: list[str]) -> tuple[Any, Any]:
    from train.config import load_tokenizer_train_config
    from train.tasks import TokenizerTask

    cfg = load_tokenizer_train_config(recipes, overrides)
    return TokenizerTask(cfg), cfg


def _finetune(recipes: list[str], overrides: list[str]) -> tuple[Any, Any]:
    from evals.finetune import FinetuneTask, load_finetune_config

    cfg = load_finetune_config(recipes, overrides)
    return FinetuneTask(cfg), cfg


def _score_finetuned(cfg: Any, summary: dict[str, Any]) -> None:
    """After `lvmae finetune`: the classifier on finetune.eval_splits, multi-view (evals.classifier_eval)."""
    from evals.classifier_eval import evaluate_classifier

    f = cfg.finetune
    if not f.eval_splits:
        return
    results = evaluate_classifier(
        summary["export"],
        cfg.data.url,
        list(f.eval_splits),
        f.temporal_views,
        f.spatial_views,
        cfg.data.decoder,
        out=cfg.run.out,
    )
    for split in f.eval_splits:
        s = results[split]
        print(
            f"  {split}: top-1 {100 * s['top1']:.1f}% on {s['num_clips']} clips (views "
            f"{results['views']}, chance {100 * s['chance']:.0f}%)"
        )
    print(f"  figures: {results['json']}")


# What `lvmae train KIND` trains: KIND -> (recipes, overrides) -> (task, config), imported when chosen (a
# bad config fails before DeepSpeed, or torch for the other commands, is imported).
TASKS: dict[str, Callable[[list[str], list[str]], tuple[Any, Any]]] = {
    "mae": _mae,
    "tokenizer": _tokenizer,
    "finetune": _finetune,
}
# What rank 0 does after a task's run: (config, summary) -> None.
AFTER: dict[str, Callable[[Any, dict[str, Any]], None]] = {"finetune": _score_finetuned}


def load_task(kind: str, items: list[str]) -> tuple[Any, Any]:
    """-> (task, config) for `lvmae train KIND ITEMS...`; config errors name the key."""
    return TASKS[kind](*split_config_args(items))


def cmd_train(args: argparse.Namespace) -> int:
    task, cfg = load_task(args.kind, args.config)  # a bad config fails before DeepSpeed is imported

    from ingest.retry import StoreUnavailable
    from ingest.tokens import TokensError
    from train.checkpoint import CheckpointError
    from train.stream import LoaderError
    from train.trainer import train

    try:
        summary = train(task, cfg, resume=args.resume)
    except (LoaderError, CheckpointError, TokensError) as err:
        raise UserError(str(err)) from None
    except StoreUnavailable as err:  # outside the training loop (which stops cleanly, see StoreOutage)
        raise UserError(f"{err}; run again with --resume auto once the store answers") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"lvmae train {task.name}: step {summary['steps']} ({summary['trained_steps']} this run, "
            f"{summary['seconds']} s, {summary['clips_per_s']} clips/s); weights: {summary['export']}"
        )
        after = AFTER.get(args.kind)
        if after is not None:
            after(cfg, summary)
    return 0


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (one rank; start several with `lvmae launch`)",
        description="Train the LVMAE model (mae) or the tokenizer with its token scorer (tokenizer) on "
        "clip shards, with DeepSpeed. Arguments: recipes (*.yaml, merged in order), then key=value overrides.",
    )
    p.add_argument("kind", choices=tuple(TASKS), help="what to train")
    p.add_argument("config", nargs="+", metavar="RECIPE_OR_OVERRIDE", help="configs/*.yaml and key=value")
    p.add_argument(
        "--resume",
        default="none",
        metavar="auto|none|PATH",
        help="auto: continue from the newest checkpoint in run.out (if any); none (default): start fresh, "
        "refusing to overwrite checkpoints; PATH: a checkpoint folder",
    )
    p.set_defaults(func=cmd_train)


def add_finetune_parser(sub: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained encoder with a classifier on labelled clips (= lvmae train finetune)",
        description="Fine-tune the encoder of finetune.init_from (RUN/export) with a mean-pooling classifier "
        "on the data set's labelled train split (layer-wise lr decay, drop path, label smoothing, mixup), "
        "then score it on val and test with multi-view testing. Same trainer, checkpoints and metrics as "
        "pretraining; several processes: lvmae launch --nproc N -- train finetune ...",
    )
    p.add_argument("config", nargs="+", metavar="RECIPE_OR_OVERRIDE", help="configs/*.yaml and key=value")
    p.add_argument("--resume", default="none", metavar="auto|none|PATH", help="as for lvmae train")
    p.set_defaults(func=cmd_train, kind="finetune")


def add_parser(sub: Any) -> None:
    """`lvmae train` and `lvmae finetune`."""
    add_train_parser(sub)
    add_finetune_parser(sub)
