"""What bench/gpu_check.py's sections share: the settings, a section's clock and context, small helpers.

Imported by gpu_check.py and its section modules (gpu_check_env, _step, _train, _tokenizer), which run
with bench/ and the repository root on sys.path (gpu_check.py puts them there).
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Settings:
    """How big each section runs: FULL on a GPU, QUICK for the CPU fallback."""

    # step
    preset: str
    frames: int
    batches: tuple[int, ...]
    decoders: tuple[str, ...]
    bf16: bool
    warmup: int  # untimed steps before the measured ones
    timed: int  # timed steps (median reported)
    matmul_n: int
    engine_recipe: str  # the DeepSpeed engine run (bench/train_step.py --one)
    engine_steps: int
    # train
    videos: int  # `lvmae ingest synth` processes, one video each, in parallel
    video_frames: int
    video_size: int
    clip_frames: int
    clip_size: int
    clip_stride: int
    shard_clips: int
    workers: int  # ingest clips processes, ingest tokens decode threads
    tokenizer_recipe: str
    mae_recipe: str
    train_steps: int
    skip_steps: int  # first steps left out of the rates (loader fill, warm-up)
    tokenizer_batch: int  # ingest tokens --batch-size (its default, 8, on the GPU)
    # tokenizer
    tokenizer_batches: tuple[int, ...]  # batch sizes timed in the tokenizer section
    tokenizer_timed: int
    budgets: tuple[tuple[str, float], ...]


class SectionTimeout(Exception):
    """A section ran past its budget plus GRACE_S."""


class Clock:
    """A section's time budget: what is left of it."""

    def __init__(self, budget: float):
        self.budget, self.start = budget, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


@dataclass
class Context:
    device: torch.device
    settings: Settings
    quick: bool
    work: Path
    json_path: Path
    log_path: Path
    result: dict[str, Any]

    def save(self) -> None:
        tmp = self.json_path.with_name(self.json_path.name + ".partial")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, self.json_path)

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.settings.bf16 else torch.float32


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:4000]


def tokenizer_config(recipe: str) -> Any:
    """The recipe's TokenizerConfig (the train section's fresh tokenizer, the tokenizer section's)."""
    from train.config import load_tokenizer_train_config

    return load_tokenizer_train_config([REPO / "configs" / f"{recipe}.yaml"], ["data.url=unused"]).tokenizer
