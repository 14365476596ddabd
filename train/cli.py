"""`lvmae train mae|tokenizer` (one rank of a run) and `lvmae launch` (starts the ranks).

    lvmae train mae configs/demo_cpu.yaml data.tokens=fsq-... [--resume auto]      # one process
    lvmae launch --nproc 2 -- train mae configs/demo_cpu.yaml data.tokens=fsq-...  # 2 ranks, deepspeed
    lvmae launch --hostfile ops/hostfile.example -- train mae configs/vitb_128f.yaml data.url=s3://...

Arguments after the subcommand are recipes (*.yaml, merged in order) and dotted overrides (key=value).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
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


def load_task(kind: str, items: list[str]) -> tuple[Any, Any]:
    """-> (task, config) for `lvmae train KIND ITEMS...`; config errors name the key."""
    from train.config import load_finetune_config, load_tokenizer_train_config, load_train_config
    from train.tasks import FinetuneTask, MAETask, TokenizerTask

    recipes, overrides = split_config_args(items)
    if kind == "mae":
        cfg = load_train_config(recipes, overrides)
        return MAETask(cfg), cfg
    if kind == "finetune":
        cfg = load_finetune_config(recipes, overrides)
        return FinetuneTask(cfg), cfg
    cfg = load_tokenizer_train_config(recipes, overrides)
    return TokenizerTask(cfg), cfg


def cmd_train(args: argparse.Namespace) -> int:
    task, cfg = load_task(args.kind, args.config)  # a bad config fails before DeepSpeed is imported

    from ingest.retry import StoreUnavailable
    from ingest.tokens import TokensError
    from train.checkpoint import CheckpointError
    from train.loader import LoaderError
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
        if task.name == "finetune" and cfg.finetune.eval_splits:
            from train.finetune import evaluate_classifier

            f = cfg.finetune
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
    return 0


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (one rank; start several with `lvmae launch`)",
        description="Train the LVMAE model (mae) or the tokenizer with its token scorer (tokenizer) on "
        "clip shards, with DeepSpeed. Arguments: recipes (*.yaml, merged in order), then key=value overrides.",
    )
    p.add_argument("kind", choices=("mae", "tokenizer", "finetune"), help="what to train")
    p.add_argument("config", nargs="+", metavar="RECIPE_OR_OVERRIDE", help="configs/*.yaml and key=value")
    p.add_argument(
        "--resume",
        default="none",
        metavar="auto|none|PATH",
        help="auto: continue from the newest checkpoint in run.out (if any); none (default): start fresh, "
        "refusing to overwrite checkpoints; PATH: a checkpoint folder",
    )
    p.set_defaults(func=cmd_train)


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from train.config import load_train_config
    from train.plan import format_report, parse_bytes, report

    recipes, overrides = split_config_args(args.config)
    for recipe in recipes:
        text = Path(recipe).read_text()
        if any(line.startswith(("tokenizer:", "finetune:")) for line in text.splitlines()):
            raise UserError(
                f"{recipe}: lvmae plan covers pretraining recipes (lvmae train mae), not this one"
            )
    # The data set is not read: placeholders stand in for the recipe's mandatory data.url / data.tokens.
    cfg = load_train_config(recipes, ["data.url=unused", "data.tokens=unused", *overrides])
    if args.gpu_memory is not None:
        try:
            gpu_bytes = parse_bytes(args.gpu_memory)
        except ValueError as err:
            raise UserError(f"--gpu-memory: {err}") from None
    else:
        import torch

        gpu_bytes = (
            torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 2**30
        )
    if args.world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {args.world_size}")
    result = report(cfg, gpu_bytes, args.world_size)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    if not result["fits"]:
        print(
            f"lvmae plan: warning: this recipe needs {result['total_bytes'] / 2**30:.1f} GiB per GPU at its peak, "
            f"more than the {result['usable_bytes'] / 2**30:.1f} GiB usable: it will run out of memory",
            file=sys.stderr,
        )
        return 1
    return 0


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="will it fit? per-GPU memory of a pretraining recipe, the largest batch, what to set",
        description="Predict one GPU's peak memory in a training step of a pretraining recipe (lvmae train "
        "mae): weights, gradients and optimizer state by precision, ZeRO stage and world size, activations "
        "counted from the model's forward on the meta device, the batch in flight. Prints the table, the "
        "largest batch and longest clip that fit, and the cheapest ZeRO stage / checkpointing that fits. "
        "Exits 1 when the recipe will not fit (docs/training.md, 'Will it fit?').",
    )
    p.add_argument("config", nargs="+", metavar="RECIPE_OR_OVERRIDE", help="configs/*.yaml and key=value")
    p.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory of one GPU, e.g. 80GiB, 141GB (default: this machine's first GPU, else 80GiB)",
    )
    p.add_argument("--world-size", type=int, default=1, help="GPUs the run uses in all (default 1)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_plan)


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


# --- lvmae eval ---------------------------------------------------------------------------------------


def cmd_eval_tokenizer(args: argparse.Namespace) -> int:
    from train.eval_tokenizer import run_eval_tokenizer, summary_lines

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
    from train.probe import ProbeConfig, run_probe, summary_line

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


def add_eval_parser(sub: Any) -> None:
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


# --- lvmae launch ---------------------------------------------------------------------------------------


def launcher_command(
    launcher: str,
    nproc: int | None,
    rest: list[str],
    *,
    hostfile: str | None = None,
    num_nodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int = 29500,
) -> list[str]:
    """The command that starts `lvmae REST...` on nproc processes per node (a pure function). With a
    hostfile and nproc None, each node runs as many processes as its `slots`."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc or 1}"]
        cmd += [f"--nnodes={num_nodes or 1}", f"--master_port={master_port}"]
        if (num_nodes or 1) > 1:
            cmd += [f"--node_rank={node_rank or 0}"]
        cmd += [f"--master_addr={master_addr or '127.0.0.1'}"]
        return [*cmd, "-m", "lvmae.cli", *rest]
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    deepspeed = shutil.which("deepspeed", path=search)
    if deepspeed is None:
        raise UserError(
            "the deepspeed launcher is not installed (pip install deepspeed), or use --launcher torchrun"
        )
    cmd = [deepspeed]
    if nproc is not None or not hostfile:
        cmd += [f"--num_gpus={nproc or 1}"]
    cmd += [f"--master_port={master_port}"]
    if hostfile:
        cmd += [f"--hostfile={hostfile}"]
        if num_nodes:
            cmd += [f"--num_nodes={num_nodes}"]
        if master_addr:
            cmd += [f"--master_addr={master_addr}"]
    else:
        # DeepSpeed reads /job/hostfile by default and goes multi-node if it exists; /dev/null is not a
        # regular file, which it takes as "this machine only".
        cmd += ["--hostfile=/dev/null", f"--master_addr={master_addr or '127.0.0.1'}"]
    return [*cmd, "--no_local_rank", "--module", "lvmae.cli", *rest]


def cmd_launch(args: argparse.Namespace) -> int:
    from lvmae.cli import build_parser

    rest = args.rest[1:] if args.rest[:1] == ["--"] else list(args.rest)
    if rest[:1] == ["finetune"]:
        rest = ["train", *rest]
    if rest[:1] != ["train"]:
        raise UserError(
            "usage: lvmae launch [options] -- train mae|tokenizer|finetune RECIPE... [key=value...]"
        )
    # Parse and check the rank command here, once, rather than fail in every rank.
    parsed = build_parser().parse_args(rest)
    load_task(parsed.kind, parsed.config)
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if args.hostfile and not Path(args.hostfile).is_file():
        raise UserError(f"no hostfile {args.hostfile}")
    cmd = launcher_command(
        args.launcher,
        args.nproc,
        rest,
        hostfile=args.hostfile,
        num_nodes=args.num_nodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )
    env = {**os.environ, "LVMAE_LAUNCHED": "1"}  # ranks stop when their launcher dies
    if "OMP_NUM_THREADS" not in env and not args.hostfile:
        # The deepspeed launcher does not set it: ranks sharing the cores would oversubscribe them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (args.nproc or 1)))
    print("lvmae launch: " + " ".join(cmd), flush=True)
    # The launcher and its ranks stay in this process group: Ctrl-C in a terminal, or a kill of the group,
    # reaches every rank. A SIGTERM sent to this process alone is passed on to the launcher.
    proc = subprocess.Popen(cmd, env=env)
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the ranks got the SIGINT too: give them time to stop
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def add_launch_parser(sub: Any) -> None:
    p = sub.add_parser(
        "launch",
        help="start a training run's ranks with the deepspeed launcher (or torchrun)",
        description="Start `lvmae train ...` on several processes: --nproc per node (GPUs, or CPU "
        "processes), on this machine or on the hosts of a DeepSpeed hostfile (see ops/hostfile.example).",
    )
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    p.add_argument(
        "--nproc",
        type=int,
        help="processes per node (default 1; with --hostfile, the `slots` of each host)",
    )
    p.add_argument(
        "--hostfile", help="DeepSpeed hostfile (MPI style: `host slots=N` per line) for multi-node"
    )
    p.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile (torchrun: N nodes)")
    p.add_argument("--node-rank", type=int, help="torchrun on several nodes: this node's rank")
    p.add_argument("--master-addr", help="address of the first node (default 127.0.0.1 on one machine)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- train mae|tokenizer RECIPE... [key=value...]")
    p.set_defaults(func=cmd_launch)


__all__ = [
    "add_eval_parser",
    "add_finetune_parser",
    "add_launch_parser",
    "add_train_parser",
    "launcher_command",
    "load_task",
    "split_config_args",
]
