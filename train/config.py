"""Typed training configuration: the OmegaConf structured schema that recipes in `configs/` merge onto.

`load_train_config(["configs/demo_cpu.yaml"], ["optim.lr=1e-4"])` merges recipes in order, then dotted
overrides, then validates. Unknown keys, wrong types and invalid values raise `ConfigError` naming the
key (`run.precision: must be one of auto, fp32, bf16; got 'fp16'`).
"""

from __future__ import annotations

import copy
import dataclasses
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.labels import SPLITS
from lvmae.config import (
    ConfigError,
    MAEConfig,
    check,
    check_choice,
    load_config,
    saved_model_dict,
    to_yaml,
)
from lvmae.tokenizer_config import TokenizerConfig

DECODER_BACKENDS = ("auto", "dali", "pyav")
PRECISIONS = ("auto", "fp32", "bf16")
ZERO_STAGES = (0, 1, 2, 3)


def global_batch(cfg: Any, world_size: int) -> int:
    """Clips per optimizer step over every rank: data.batch_size x data.grad_accum x world_size."""
    return cfg.data.batch_size * cfg.data.grad_accum * world_size


@dataclass
class DataConfig:
    """Where clips (and, for token targets, the tokenizer's codes and priorities) stream from."""

    url: str = "???"  # clip shards' data set root: a local path, file://, s3://, ...
    # Tokenizer id of the token set (tokens/<id> in the data set: codes and priorities); None when neither
    # the target nor the decoder masking needs tokens.
    tokens: str | None = None
    # Train on one split of the data set only (train / val / test, made by source video at ingest); None:
    # every sample. Pretraining on `train` keeps the probe's val and test videos unseen.
    split: str | None = None
    batch_size: int = 8  # per rank, per forward pass (the micro batch)
    # micro batches a rank accumulates into one optimizer step: the global batch is batch_size x grad_accum
    # x ranks. A run resumed on another number of ranks keeps its global batch through this (train.elastic)
    grad_accum: int = 1
    shuffle_buffer: int = 256  # samples
    decoder: str = "auto"  # clip decoder backend: auto (DALI where installed), dali, pyav
    # DALI threads per rank (PyAV: 2 or more convert in a helper thread); 0: cores / ranks per node
    decode_threads: int = 0
    retries: int = 3  # re-reads of a damaged shard (tar error) before it is passed over
    # seconds one store read (shard, index, token rows) may keep failing before the run saves a checkpoint
    # and stops; a store outage shorter than this is waited out (backoff with jitter, ingest.retry)
    retry_deadline_s: float = 300.0
    # Passed to fsspec. Empty: the endpoint comes from AWS_ENDPOINT_URL(_S3) and keys from the standard AWS
    # environment and files. Keys written here are never saved with the run (see redacted()).
    storage_options: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str = "data") -> None:
        check(bool(self.url), f"{prefix}.url", "must name the data set")
        check(self.batch_size >= 1, f"{prefix}.batch_size", "must be a positive integer")
        check(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be a positive integer")
        if self.split is not None:
            check_choice(self.split, f"{prefix}.split", SPLITS)
        check(self.shuffle_buffer >= 0, f"{prefix}.shuffle_buffer", "must be >= 0")
        check_choice(self.decoder, f"{prefix}.decoder", DECODER_BACKENDS)
        check(self.decode_threads >= 0, f"{prefix}.decode_threads", "must be >= 0 (0: automatic)")
        check(self.retries >= 0, f"{prefix}.retries", "must be >= 0")
        check(self.retry_deadline_s >= 0, f"{prefix}.retry_deadline_s", "must be >= 0 (seconds)")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr (see train.engine.lr_at)."""

    lr: float = 1.5e-4
    # 0: lr is the peak rate, whatever the batch. N > 0: lr is the rate at a global batch of N, and the run
    # uses lr x global batch / N (global batch: data.batch_size x data.grad_accum x ranks), MAE's and
    # VideoMAE's rule with N = 256 (train.engine.effective_lr). min_lr stays absolute.
    lr_reference_batch: int = 0
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 1000
    total_steps: int = 100_000
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self, prefix: str = "optim") -> None:
        check(self.lr > 0, f"{prefix}.lr", "must be positive")
        check(
            self.lr_reference_batch >= 0,
            f"{prefix}.lr_reference_batch",
            "must be >= 0 (0: lr as given; N: lr is the rate at a global batch of N)",
        )
        if self.lr_reference_batch == 0:
            check(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must be in [0, lr={self.lr}]")
        else:  # against the scaled rate once the world size is known (train.engine.scaled_optim)
            check(self.min_lr >= 0, f"{prefix}.min_lr", "must be >= 0")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{prefix}.betas",
            f"needs two values in [0, 1); got {list(self.betas)}",
        )
        check(self.total_steps >= 1, f"{prefix}.total_steps", "must be a positive integer")
        check(
            0 <= self.warmup_steps <= self.total_steps,
            f"{prefix}.warmup_steps",
            f"must be in [0, total_steps={self.total_steps}]",
        )
        check(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0")


@dataclass
class RunConfig:
    """One training run: output, length, checkpoints, numerics, parallelism and metrics."""

    # The run folder: a local (or shared) path, or a URL on object storage (s3://bucket/runs/x, any fsspec
    # URL; endpoint and keys from the environment), see train.rundir.
    out: str = "runs/default"
    # Where each node stages the files of a run.out URL before they are uploaded (checkpoints, log,
    # export); None: $TMPDIR/lvmae-stage/<name>-<hash of the URL>. `{node}` and `{rank}` are filled in.
    stage_dir: str | None = None
    seed: int = 0
    steps: int = 100_000  # optimizer steps this run trains to (may stop before optim.total_steps)
    checkpoint_every: int = 1000  # steps; 0 saves only at the end
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    precision: str = "auto"  # auto: bf16 where CUDA supports it, else fp32
    zero_stage: int = 3
    activation_checkpointing: bool = False  # recompute each transformer block's activations in backward
    metrics_port_base: int = 9400  # rank r serves Prometheus metrics on port base + r; 0 disables
    metrics_addr: str = "127.0.0.1"
    log_every: int = 10  # steps
    # Keep the checkpoint of the best in-run probe score (eval.*; checkpoints/best.json names it) beside
    # the last keep_last; an eval that beats the best saves a checkpoint of its step if none is due.
    keep_best: bool = False
    # Signals that ask the run to stop after its current step with a checkpoint, and exit 75 for a requeue
    # (train.preempt); preempt_grace_s: the time the scheduler allows between its signal and its kill
    # (Slurm's --signal lead): a run that takes longer to save says so.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    preempt_grace_s: float = 120.0
    # Every rank writes the keys of the samples it trained on at each step to RUN/samples/rank-R.jsonl
    # (train.runlog.sample_log), so that anyone can audit that an epoch saw each sample once
    sample_log: bool = False

    def validate(self, prefix: str = "run") -> None:
        check(bool(self.out), f"{prefix}.out", "must name an output directory")
        if "://" in self.out:
            import fsspec

            protocol = self.out.split("://", 1)[0]
            check(
                protocol in fsspec.available_protocols(),
                f"{prefix}.out",
                f"unknown storage protocol {protocol!r} (a local path, or a URL such as s3://bucket/runs/x)",
            )
        check(self.stage_dir is None or bool(self.stage_dir), f"{prefix}.stage_dir", "must name a folder")
        check(self.steps >= 1, f"{prefix}.steps", "must be a positive integer")
        check(self.checkpoint_every >= 0, f"{prefix}.checkpoint_every", "must be >= 0")
        check(self.keep_last >= 0, f"{prefix}.keep_last", "must be >= 0")
        check_choice(self.precision, f"{prefix}.precision", PRECISIONS)
        check_choice(self.zero_stage, f"{prefix}.zero_stage", ZERO_STAGES)
        check(
            self.metrics_port_base == 0 or 1024 <= self.metrics_port_base <= 65535,
            f"{prefix}.metrics_port_base",
            f"must be 0 (off) or a port in [1024, 65535]; got {self.metrics_port_base}",
        )
        check(bool(self.metrics_addr), f"{prefix}.metrics_addr", "must be an address")
        check(self.log_every >= 1, f"{prefix}.log_every", "must be a positive integer")
        for name in self.preempt_signals:
            check(
                isinstance(getattr(signal, str(name), None), signal.Signals)
                and name not in ("SIGKILL", "SIGSTOP"),
                f"{prefix}.preempt_signals",
                f"{name!r} is not a signal a process can catch (e.g. SIGTERM, SIGUSR1)",
            )
        check(self.preempt_grace_s > 0, f"{prefix}.preempt_grace_s", "must be positive (seconds)")


@dataclass
class EvalConfig:
    """The health probe inside a pretraining run (train.health): a k-NN probe and collapse signals on the
    frozen encoder's pooled features of labelled clips, every `every` steps, at step 0 and at the end."""

    every: int = 0  # steps; 0: off
    # A labelled data set (lvmae ingest clips with labels; its clips the model's length and size); None:
    # data.url. Its splits are made by source video at ingest.
    data: str | None = None
    train_split: str = "train"  # the k-NN memory bank
    split: str = "val"  # the held-out clips it scores (pick val: best-checkpoint choice should not see test)
    max_clips: int = 512  # per split, at most
    k: int = 20  # neighbours that vote

    def validate(self, prefix: str = "eval") -> None:
        check(self.every >= 0, f"{prefix}.every", "must be >= 0 (0: off)")
        check(self.data is None or bool(self.data), f"{prefix}.data", "must name a data set")
        check_choice(self.train_split, f"{prefix}.train_split", SPLITS)
        check_choice(self.split, f"{prefix}.split", SPLITS)
        check(self.split != self.train_split, f"{prefix}.split", "must differ from eval.train_split")
        check(self.max_clips >= 1, f"{prefix}.max_clips", "must be a positive integer")
        check(self.k >= 1, f"{prefix}.k", "must be a positive integer")


def validate_training(
    data: DataConfig, optim: OptimConfig, run: RunConfig, evals: EvalConfig | None = None
) -> None:
    """The sections every training config shares (this module's and evals.finetune's), and how they
    bound each other."""
    data.validate("data")
    optim.validate("optim")
    run.validate("run")
    if evals is not None:
        evals.validate("eval")
    check(
        not run.keep_best or (evals is not None and evals.every > 0),
        "run.keep_best",
        "needs the in-run probe: set eval.every (pretraining runs only)",
    )
    check(
        run.steps <= optim.total_steps,
        "run.steps",
        f"{run.steps} exceeds optim.total_steps {optim.total_steps} (the schedule's end)",
    )


@dataclass
class PretrainModelConfig(MAEConfig):
    """The model of a pretraining run: an MAEConfig, and the weights it may start from."""

    # An exported MAE (RUN/export, what lvmae.weights.save_mae writes) or its run folder: its encoder (and
    # its decoder, where the shapes match) start this run instead of a random init. Its tubelet, encoder
    # sizes, pos_embed and input_norm must be this run's; its clip length and size may differ (the position
    # tables are fixed functions of the grid). Not part of the model: exports do not carry it.
    init_from: str | None = None

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        check(self.init_from is None or bool(self.init_from), f"{prefix}.init_from", "must name an export")


@dataclass
class TrainConfig:
    """Everything one pretraining run needs; saved, resolved, with every run and checkpoint."""

    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        self.model.validate("model")
        validate_training(self.data, self.optim, self.run, self.eval)
        if self.model.target.kind == "tokens" or self.model.masking.needs_token_priority:
            check(
                self.data.tokens is not None,
                "data.tokens",
                "token targets and the tokenizer's priority (model.masking.priority) need a token set: the "
                "tokenizer id under tokens/",
            )

    def model_config(self) -> MAEConfig:
        """The model config to build: the preset resolved, and run.activation_checkpointing applied."""
        model = copy.deepcopy(self.model).resolved()
        cfg = MAEConfig(**{f.name: getattr(model, f.name) for f in dataclasses.fields(MAEConfig)})
        if self.run.activation_checkpointing:
            cfg.encoder.grad_checkpointing = True
            cfg.decoder.grad_checkpointing = True
        return cfg


@dataclass
class TokenizerTrainConfig:
    """Fitting the FSQ-MagViT tokenizer and its token scorer on clip shards (`lvmae train tokenizer`)."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/tokenizer"))

    def validate(self) -> None:
        self.tokenizer.validate("tokenizer")
        validate_training(self.data, self.optim, self.run)
        check(self.data.tokens is None, "data.tokens", "the tokenizer trains on clips alone: leave it unset")


SECRET_OPTION = ("key", "secret", "token", "password", "credential")


def redacted(options: Any) -> Any:
    """storage_options with every value under a credential-like key replaced by "<redacted>" (nested)."""
    if isinstance(options, dict):
        return {
            k: "<redacted>" if any(w in str(k).lower() for w in SECRET_OPTION) else redacted(v)
            for k, v in options.items()
        }
    if isinstance(options, list):
        return [redacted(v) for v in options]
    return options


def saved_yaml(cfg: Any) -> str:
    """The resolved config as YAML, as runs and checkpoints save it: credentials redacted."""
    saved = copy.deepcopy(cfg)
    saved.data.storage_options = redacted(dict(saved.data.storage_options))
    return to_yaml(saved)


def load_train_config(
    recipe_paths: Iterable[str | Path | dict[str, Any]] = (), overrides: Sequence[str] = ()
) -> TrainConfig:
    """Merge recipes (YAML paths or dicts) in order and dotted overrides onto TrainConfig; validate."""
    return load_config(TrainConfig, recipe_paths, overrides)


def load_saved_train_config(path: str | Path) -> TrainConfig:
    """A run's or checkpoint's saved config.yaml -> TrainConfig, its model section read as it was trained
    (lvmae.config.saved_model_dict: options it predates take their old values, not today's defaults)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(raw, dict) or not isinstance(raw.get("model", {}), dict):
        raise ConfigError(f"{path}: not a training config")
    return load_train_config([{**raw, "model": saved_model_dict(raw.get("model", {}))}])


def load_tokenizer_train_config(
    recipe_paths: Iterable[str | Path | dict[str, Any]] = (), overrides: Sequence[str] = ()
) -> TokenizerTrainConfig:
    """The same for TokenizerTrainConfig."""
    return load_config(TokenizerTrainConfig, recipe_paths, overrides)


__all__ = [
    "DataConfig",
    "EvalConfig",
    "OptimConfig",
    "PretrainModelConfig",
    "RunConfig",
    "TokenizerTrainConfig",
    "TrainConfig",
    "load_saved_train_config",
    "load_tokenizer_train_config",
    "load_train_config",
    "redacted",
    "saved_yaml",
    "validate_training",
]
