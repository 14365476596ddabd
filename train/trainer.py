"""One rank of a training run (`lvmae train mae|tokenizer`), built from small steps:

    dist = join_process_group()                      # from the launcher's env; one process alone works too
    loader = build_loader(cfg, task, dist, device)   # shards of this rank, DALI (or PyAV) decode, tokens
    engine, scheduler = build_model_and_engine(...)  # the task's model under ZeRO-3, AdamW, warmup-cosine
    metrics = build_metrics(cfg, dist)               # Prometheus exporter on port base + rank, file-SD list
    step = resume(...)                               # --resume auto: newest checkpoint, loader position
    for each step: batch (read ahead by a thread) -> loss -> backward -> step -> metrics, log, checkpoint
    export                                           # safetensors through a ZeRO-3 gather

run.out may be a URL (s3://...): ranks then write into a local stage and upload (train.rundir, and the commit
order of StoredCheckpoints in train.checkpoint).

Exact resume: shard order, shuffle and skips are functions of (seed, epoch, rank) and the loader's saved
position; each step's masks come from a generator seeded by (seed, step, rank); parameters, optimizer, lr
schedule and RNG states come back from the checkpoint. So a run killed and resumed trains on the same
samples with the same masks as an uninterrupted one, and on a CPU in fp32 its losses are identical.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ingest.retry import StoreUnavailable
from lvmae.errors import UserError
from lvmae.weights import write_text_atomically
from train.checkpoint import CheckpointError, Checkpoints, open_checkpoints
from train.config import saved_yaml
from train.decode import ships_uint8, video_to
from train.engine import (
    build_engine,
    export_state_dict,
    init_distributed,
    load_full_state,
    model_init_context,
    resolve_precision,
)
from train.loader import READ_AHEAD_BATCHES, ClipLoader, join_readers, prefetch
from train.metrics import TrainMetrics, peak_memory_bytes, write_targets
from train.rundir import RunDir
from train.tasks import Task

LOG_FILE = "train_log.jsonl"  # one line per optimizer step, written by rank 0
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def node(self) -> int:
        return self.rank // self.local_world_size


def free_port(pair: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (with pair=True, one whose successor is free too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if not pair:
                return port
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def join_process_group() -> Dist:
    """Read RANK, WORLD_SIZE, LOCAL_RANK... (torchrun and the deepspeed launcher set them; a process started
    alone is rank 0 of 1) and join the process group."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    world = int(os.environ["WORLD_SIZE"])
    dist = Dist(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if "LVMAE_LAUNCHED" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_parent()
    # DeepSpeed's ZeRO-3 calls a torch collective that torch 2.13 deprecates, once per step: not ours to fix.
    warnings.filterwarnings(
        "ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning
    )
    init_distributed()
    return dist


def exit_with_parent(interval: float = 1.0) -> None:
    """End this rank when its launcher dies. torchrun starts ranks in sessions of their own, so a killed
    launcher would leave them training, and writing checkpoints, beside the run that resumes them."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                print(
                    f"rank {os.environ.get('RANK')}: the launcher (pid {parent}) died; stopping", flush=True
                )
                os._exit(1)

    threading.Thread(target=watch, name="lvmae-parent-watch", daemon=True).start()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's mask generator on one rank: independent of everything that came before."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def build_loader(cfg: Any, task: Task, dist: Dist, device: torch.device | None = None) -> ClipLoader:
    """device: where the steps run; with the PyAV decoder on CUDA, batches come as uint8 and are
    converted there (train.decode.ships_uint8, video_to)."""
    threads = cfg.data.decode_threads or max(1, (os.cpu_count() or 1) // dist.local_world_size)
    uint8 = device is not None and ships_uint8(cfg.data.decoder, device)
    loader = ClipLoader(
        cfg.data.url,
        cfg.data.batch_size,
        seed=cfg.run.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        tokens=task.tokens,
        decoder=cfg.data.decoder,
        storage_options=cfg.data.storage_options or None,  # None: endpoint from the environment
        retries=cfg.data.retries,
        retry_deadline=cfg.data.retry_deadline_s,
        split=cfg.data.split,
        labels=getattr(task, "labels", False),
        decoder_kwargs={"num_threads": threads, "device_id": dist.local_rank}
        | ({"uint8": True} if uint8 else {}),
    )
    attrs = dict(loader.tokens.group.attrs) if loader.tokens is not None else None
    task.check_data(loader.spec, attrs, cfg.data.url)
    if hasattr(task, "set_classes"):
        task.set_classes(loader.classes, loader.label_counts)
    return loader


def build_metrics(cfg: Any, dist: Dist, run: RunDir | None = None) -> TrainMetrics:
    """This rank's exporter on port base + rank; local rank 0 writes the node's file-SD target list, beside
    the run folder (for a run on object storage: beside its local stage folder)."""
    metrics = TrainMetrics(rank=dist.rank)
    base, addr = cfg.run.metrics_port_base, cfg.run.metrics_addr
    if base == 0:
        return metrics
    try:
        metrics.serve(base + dist.rank, addr)
    except OSError as err:
        raise UserError(
            f"rank {dist.rank} cannot serve metrics on {addr}:{base + dist.rank} ({err}): set "
            "run.metrics_port_base to free ports (or 0 to turn metrics off)"
        ) from None
    if dist.local_rank == 0:
        run = run or RunDir(cfg.run.out)
        first = dist.node * dist.local_world_size
        ports = [base + first + i for i in range(dist.local_world_size)]
        host = socket.gethostname() if addr in ("0.0.0.0", "::") else addr
        name = run.name if dist.world_size == dist.local_world_size else f"{run.name}-node{dist.node}"
        write_targets(run.local.parent, run.name, ports, host, first_rank=first, name=name)
    return metrics


class TrainLog:
    """RUN/train_log.jsonl: one JSON line per step (rank 0). On resume, lines past the checkpoint's step
    are dropped, so the log holds each step once, as an uninterrupted run would have written it."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self._file: Any = None

    def truncate(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in read_log(self.path) if line["step"] <= step]
        write_text_atomically(self.path, "".join(json.dumps(line) + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (open for the whole run)
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl (a line cut short by a kill is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def pick_checkpoint(ckpts: Checkpoints, resume: str) -> Path | None:
    """--resume none (the default: refuse to train over existing checkpoints), auto, or a checkpoint path."""
    latest = ckpts.latest()
    if resume == "none":
        if latest is not None:
            raise CheckpointError(
                f"{ckpts.location} already holds checkpoints (newest: {latest.name}): pass --resume auto to "
                "continue that run, or set run.out to a new folder"
            )
        return None
    if resume == "auto":
        return latest
    return ckpts.named(resume)


def check_resumed_model(saved_config: Path, cfg: Any, where: str) -> None:
    """Refuse to resume a checkpoint under model options that change what its weights mean without
    changing their shapes (position table, input normalization; a classifier's pooling, whose final-norm
    weights would not load either). A checkpoint saved before an option
    existed was trained with its old value (lvmae.config.saved_model_dict), whatever today's default."""
    from omegaconf import OmegaConf

    from lvmae.config import saved_classifier_dict, saved_model_dict

    if not saved_config.is_file():
        return
    raw = OmegaConf.to_container(OmegaConf.load(saved_config))
    raw = raw if isinstance(raw, dict) else {}
    sections = []
    model = getattr(cfg, "model", None)
    if model is not None and hasattr(model, "pos_embed"):
        sections.append(
            ("model", model, saved_model_dict(raw.get("model") or {}), ("pos_embed", "input_norm"))
        )
    finetune = getattr(cfg, "finetune", None)
    if finetune is not None and hasattr(finetune, "pooling"):
        sections.append(
            ("finetune", finetune, saved_classifier_dict(raw.get("finetune") or {}), ("pooling",))
        )
    for name, section, saved, keys in sections:
        for key in keys:
            if key in saved and saved[key] != getattr(section, key):
                raise CheckpointError(
                    f"{where} was trained with {name}.{key}={saved[key]}, this run has {name}.{key}="
                    f"{getattr(section, key)}: pass {name}.{key}={saved[key]} to resume it"
                )


class StoreOutage(UserError):
    """The store stayed unreachable past data.retry_deadline_s: the run stopped between two steps."""

    abandon_in_flight = True  # lvmae.cli exits without tearing down reads still waiting on the store


def next_batch(batches: Any) -> tuple[dict[str, Any] | None, StoreUnavailable | None]:
    """The next batch, or (None, the outage) when the loader gave up waiting for the store."""
    try:
        return next(batches), None
    except StoreUnavailable as err:
        return None, err


def every_rank_has(tdist: Any, ok: bool, device: torch.device) -> bool:
    """True when every rank has its batch (one small all-reduce): a rank whose loader gave up makes every
    rank stop together, between steps, instead of leaving the others blocked in the step's collectives."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
    return bool(flag.item())


def outage_message(outage: StoreUnavailable | None, rank: int, step: int, kept: str) -> str:
    why = f"rank {rank}: {outage}" if outage is not None else "another rank's loader gave up on the store"
    return f"stopped at step {step}: {why}; {kept}: run again with --resume auto once the store answers"


def _say(dist: Dist, msg: str) -> None:
    if dist.rank == 0:
        print(msg, flush=True)


def train(task: Task, cfg: Any, resume: str = "none") -> dict[str, Any]:
    """Run (or continue) one training run on this rank; -> a summary (rank 0's figures)."""
    import torch.distributed as tdist

    dist = join_process_group()
    run = RunDir(cfg.run.out, cfg.run.stage_dir, rank=dist.rank, node=dist.node)
    out = run.local  # the run folder, or this node's stage of a run on object storage (train.rundir)
    precision = resolve_precision(cfg.run.precision)
    device = torch.device("cuda", dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    loader = build_loader(cfg, task, dist, device)
    ckpts = open_checkpoints(run, dist.rank, dist.world_size, cfg.run.keep_last)
    start = pick_checkpoint(ckpts, resume)
    metrics = build_metrics(cfg, dist, run)  # a busy port fails here, before anything is written
    metrics.watch_store(loader.retry)  # retries and stalled seconds, live while the loader waits
    config_yaml = saved_yaml(cfg)
    if run.remote:
        out.mkdir(parents=True, exist_ok=True)  # every node its own stage
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        removed = ckpts.remove_stale()
        if removed:
            print(f"removed unfinished checkpoint saves: {', '.join(removed)}", flush=True)
        (out / CONFIG_FILE).write_text(config_yaml)
        run.upload(CONFIG_FILE)
    tdist.barrier()

    torch.manual_seed(cfg.run.seed)
    with model_init_context(cfg):
        model = task.build_model()
    initial = task.initial_state() if hasattr(task, "initial_state") else None
    if initial is not None:  # e.g. a pretrained encoder under a fresh head
        load_full_state(model, initial)
    engine, _, scheduler = build_engine(model, cfg, dist.world_size, getattr(task, "lr_scale", None))
    step = 0
    log = TrainLog(out / LOG_FILE, enabled=dist.rank == 0)
    if start is not None:
        if run.remote:  # the checkpoint's config, before DeepSpeed loads weights it may not fit
            run.download(f"checkpoints/{start.name}/{CONFIG_FILE}")
        check_resumed_model(start / CONFIG_FILE, cfg, ckpts.where(start))
        step, state = ckpts.load(engine, start)
        loader.load_state_dict(state["loader"])
        if run.remote and dist.rank == 0:
            run.download(LOG_FILE)  # uploaded before the checkpoint's commit: it reaches (at least) its step
        log.truncate(step)
        _say(dist, f"resumed from {ckpts.where(start)} at step {step}")
    elif run.remote:
        log.truncate(0)  # a stage can hold the log of an earlier run at this URL
    if step > cfg.run.steps:
        raise CheckpointError(f"{ckpts.where(start)} is at step {step}, past run.steps={cfg.run.steps}")
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    _say(
        dist,
        f"lvmae train {task.name}: {n_params / 1e6:.2f} M parameters, {dist.world_size} rank(s), "
        f"ZeRO-{cfg.run.zero_stage}, {precision}, {device.type}, batch {cfg.data.batch_size}/rank, "
        f"steps {step} -> {cfg.run.steps}, out {run}",
    )

    loader_state = loader.state_dict()
    started, first_step = time.perf_counter(), step
    saved = step if start is not None else -1  # the step of the newest checkpoint
    batches = prefetch(iter(loader), depth=READ_AHEAD_BATCHES)  # decoding the next batches overlaps this step
    try:
        while step < cfg.run.steps:
            t0 = time.perf_counter()
            batch, outage = next_batch(batches)
            if not every_rank_has(tdist, outage is None, device):  # before any collective of the step
                saved_now = ""
                if saved < step:  # all ranks are here, between steps: a checkpoint is still possible
                    rank_state = {"loader": loader_state, "step": step}
                    try:
                        path = ckpts.save(engine, step, rank_state, config_yaml, run_files=(LOG_FILE,))
                        saved, saved_now = step, f"checkpoint {ckpts.where(path)} saved"
                    except Exception as err:  # the run folder may sit on the same unreachable store
                        saved_now = f"no checkpoint could be saved ({type(err).__name__}: {err})"
                loader.retry.cancel()  # reads still waiting for the store give up now, and end their threads
                batches.close()
                join_readers(timeout=60)
                kept = saved_now or (
                    f"the checkpoint of step {saved} stays" if saved >= 0 else "no checkpoint yet"
                )
                raise StoreOutage(outage_message(outage, dist.rank, step, kept))
            t1 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            video = video_to(batch["video"], device, dtype)  # uint8 batches are converted there
            gen = torch.Generator().manual_seed(step_seed(cfg.run.seed, step, dist.rank))
            loss = task.loss(engine, batch, video, gen, step)
            engine.backward(loss)
            engine.step()
            step += 1
            loss_sum = loss.detach().float().reshape(1)
            tdist.all_reduce(loss_sum)  # sync point: every rank's loss, for one curve of the run
            mean_loss = loss_sum.item() / dist.world_size
            grad_norm = engine.get_global_grad_norm()
            extra = task.step_metrics() if hasattr(task, "step_metrics") else {}
            if extra:  # averaged over ranks, like the loss
                values = torch.tensor(list(extra.values()), dtype=torch.float32, device=loss_sum.device)
                tdist.all_reduce(values)
                extra = dict(zip(extra, (values / dist.world_size).tolist()))
            t2 = time.perf_counter()
            loader_state = batch["state"]  # the loader reads ahead; this is where this step's data ended
            n = len(batch["keys"])
            metrics.step(
                samples=n,
                tokens=n * task.tokens_per_sample,
                data_wait_s=t1 - t0,
                compute_s=t2 - t1,
                loss=mean_loss,
                lr=lr,
                grad_norm=None if grad_norm is None else float(grad_norm),
                accuracy=extra.get("accuracy"),
            )
            st = loader.stats
            metrics.loader(
                queue_depth=int(st["queue_depth"]),
                frames=int(st["frames"]),
                read_bytes=int(st["bytes_read"]),
                retries=int(st["retries"]),
                errors=int(st["bad_shards"]),
                skipped=int(st["skipped"]),
            )
            record = {
                "step": step,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "samples": n * dist.world_size,
                "data_wait_s": round(t1 - t0, 6),
                "compute_s": round(t2 - t1, 6),
                "epoch": batch["epoch"],
                **extra,
            }
            log.write(record)
            if not np.isfinite(mean_loss):
                _say(
                    dist,
                    f"step {step}: the loss is {mean_loss} (counted in lvmae_train_nonfinite_loss_total)",
                )
            if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                elapsed = time.perf_counter() - started
                rate = (step - first_step) * cfg.data.batch_size * dist.world_size / max(elapsed, 1e-9)
                _say(
                    dist,
                    f"step {step}/{cfg.run.steps}  loss {mean_loss:.4f}  lr {lr:.2e}  {rate:.1f} clips/s  "
                    f"data wait {100 * (t1 - t0) / max(t2 - t0, 1e-9):.0f}%  "
                    f"peak {peak_memory_bytes()[1] / 2**30:.2f} GiB",
                )
            every = cfg.run.checkpoint_every
            if (every and step % every == 0) or step == cfg.run.steps:
                rank_state = {"loader": loader_state, "step": step}
                path = ckpts.save(engine, step, rank_state, config_yaml, run_files=(LOG_FILE,))
                saved = step
                uploaded = f" (uploaded in {ckpts.upload_seconds:.2f} s)" if run.remote else ""
                metrics.checkpoint(upload_s=ckpts.upload_seconds)
                _say(dist, f"checkpoint {ckpts.where(path)}{uploaded}")
    finally:
        batches.close()
        log.close()
    seconds = time.perf_counter() - started

    state = export_state_dict(engine)  # collective
    exported = None
    if dist.rank == 0:
        exported = task.export(state, out)
        if run.remote:
            run.upload_tree(exported.relative_to(out).as_posix())
        print(f"exported {run.where(exported)}", flush=True)
    tdist.barrier()
    summary = {
        "task": task.name,
        "steps": step,
        "trained_steps": step - first_step,
        "seconds": round(seconds, 2),
        "clips_per_s": round(
            (step - first_step) * cfg.data.batch_size * dist.world_size / max(seconds, 1e-9), 2
        ),
        "export": run.where(exported) if exported else None,
        "peak_memory": dict(zip(("kind", "bytes"), peak_memory_bytes())),
        "loader": dict(loader.stats),
    }
    if dist.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        for rel in (LOG_FILE, "summary.json"):
            if (out / rel).is_file():
                run.upload(rel)
    tdist.destroy_process_group()
    return summary
