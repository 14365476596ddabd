"""One rank of a training run (`lvmae train mae|tokenizer|finetune`), built from named steps:

    trainer = Trainer(task, cfg, resume="auto")   # build: process group, run folder, loader, checkpoints,
                                                  # metrics, the task's model under its DeepSpeed engine,
                                                  # then restore the newest checkpoint (--resume auto)
    summary = trainer.run()                       # for each step: next_batches -> train_step -> log_step ->
                                                  # checkpoint when due; then export and the summary

`train(task, cfg, resume)` does both. The task (train.tasks.Task) gives the model, its loss, its data checks
and its export; train.engine holds DeepSpeed (the ZeRO stage comes from run.zero_stage); the loader
(train.loader) streams the clips; run.out may be a URL (s3://...): ranks then write into a local stage and
upload (train.rundir, and the commit order of StoredCheckpoints in train.checkpoint).

Exact resume: shard order, shuffle and skips are functions of (seed, epoch, rank) and the loader's saved
position; each step's masks come from a generator seeded by (seed, step, rank); parameters, optimizer, lr
schedule and RNG states come back from the checkpoint. So a run killed and resumed trains on the same
samples with the same masks as an uninterrupted one, and on a CPU in fp32 its losses are identical.
A checkpoint of another world size resumes through train.elastic: its global batch kept (micro batch x
data.grad_accum), its weights through DeepSpeed's universal format, the epoch in flight re-sharded.

A store outage longer than data.retry_deadline_s stops every rank together, between two steps, with a
checkpoint where one can still be written (`stop_for_outage`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ingest.retry import StoreUnavailable
from lvmae.errors import UserError
from train.checkpoint import META, CheckpointError, open_checkpoints, step_name
from train.config import global_batch, saved_yaml
from train.decoders import video_to
from train.dist import every_rank_has, join_process_group
from train.elastic import converts, fit_world, load_resized
from train.engine import (
    build_engine,
    effective_lr,
    export_state_dict,
    load_full_state,
    model_init_context,
    resolve_precision,
)
from train.health import HealthProbe, eval_line
from train.metrics import peak_memory_bytes
from train.parts import build_loader, build_metrics, loader_kwargs
from train.preempt import Preempted, Preemption, preempted_message
from train.resume import check_resumed_model, pick_checkpoint, saved_config
from train.rundir import RunDir
from train.runlog import LOG_FILE, TrainLog, eval_records, read_log, sample_log, truncate_samples
from train.stream import READ_AHEAD_BATCHES, join_readers, prefetch
from train.tasks import Task

CONFIG_FILE = "config.yaml"


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's mask generator on one rank: independent of everything that came before."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class StoreOutage(UserError):
    """The store stayed unreachable past data.retry_deadline_s: the run stopped between two steps."""

    abandon_in_flight = True  # lvmae_cli exits without tearing down reads still waiting on the store


def next_batches(batches: Any, n: int) -> tuple[list[dict[str, Any]], StoreUnavailable | None]:
    """The next `n` batches (one step's micro batches), or those got and the outage when the loader gave
    up waiting for the store."""
    got = []
    try:
        while len(got) < n:
            got.append(next(batches))
    except StoreUnavailable as err:
        return got, err
    return got, None


def outage_message(outage: StoreUnavailable | None, rank: int, step: int, kept: str) -> str:
    why = f"rank {rank}: {outage}" if outage is not None else "another rank's loader gave up on the store"
    return f"stopped at step {step}: {why}; {kept}: run again with --resume auto once the store answers"


class Trainer:
    """One rank of one run: build (in __init__), then `run()`."""

    def __init__(self, task: Task, cfg: Any, resume: str = "none"):
        import torch.distributed as tdist

        self.task, self.cfg, self.tdist = task, cfg, tdist
        self.dist = dist = join_process_group()
        self.run_dir = RunDir(cfg.run.out, cfg.run.stage_dir, rank=dist.rank, node=dist.node)
        self.out = self.run_dir.local  # the run folder, or this node's stage of a run on object storage
        self.precision = resolve_precision(cfg.run.precision)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", dist.local_rank) if cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32

        self.ckpts = open_checkpoints(self.run_dir, dist.rank, dist.world_size, cfg.run.keep_last)
        self.start = pick_checkpoint(self.ckpts, resume)
        self.cfg = cfg = self.fit_world(cfg)  # another world size than the checkpoint's: its global batch
        self.loader = build_loader(cfg, task, dist, self.device)
        self.loader.step_batches = cfg.data.grad_accum
        evals = getattr(cfg, "eval", None)  # pretraining runs only (train.config.EvalConfig)
        self.health = (
            HealthProbe(cfg, task, dist, loader_kwargs(cfg, dist, self.device))
            if evals is not None and evals.every
            else None
        )
        self.ckpts.meta_extra = {  # the batch plan, which a resume on another world size keeps
            "global_batch": global_batch(cfg, dist.world_size),
            "micro_batch": cfg.data.batch_size,
            "grad_accum": cfg.data.grad_accum,
        }
        self.metrics = build_metrics(cfg, dist, self.run_dir)  # a busy port fails here, before any write
        self.metrics.watch_store(self.loader.retry)  # retries and stalled seconds, live while it waits
        self.config_yaml = saved_yaml(cfg)
        self.prepare_run_folder()
        self.engine, self.scheduler = self.build_engine()
        self.log = TrainLog(self.out / LOG_FILE, enabled=dist.rank == 0)
        self.samples = sample_log(self.out, dist.rank, cfg.run.sample_log)
        self.step = self.restore()
        self.saved = self.step if self.start is not None else -1  # the step of the newest checkpoint
        self.loader_state = self.loader.state_dict()  # where the data of the last step taken ended
        self.preemption = Preemption(cfg.run.preempt_signals)  # noted now; acted on between steps

    # --- build ------------------------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        if self.dist.rank == 0:
            print(msg, flush=True)

    def prepare_run_folder(self) -> None:
        """Rank 0 clears unfinished checkpoint saves and writes the resolved config; every node makes its
        stage of a run on object storage."""
        if self.run_dir.remote:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            removed = self.ckpts.remove_stale()
            if removed:
                print(f"removed unfinished checkpoint saves: {', '.join(removed)}", flush=True)
            (self.out / CONFIG_FILE).write_text(self.config_yaml)
            self.run_dir.upload(CONFIG_FILE)
        self.tdist.barrier()

    def fit_world(self, cfg: Any) -> Any:
        """The config to train with (train.elastic.fit_world): on another world size than the checkpoint's,
        the micro batch and accumulation that keep its global batch. self.resized says what changed."""
        self.resized, start = "", self.start
        if start is not None:
            if self.run_dir.remote:  # the checkpoint's config and meta: every rank reads them now
                for name in (CONFIG_FILE, META):
                    self.run_dir.download(f"checkpoints/{start.name}/{name}")
            meta = json.loads((start / META).read_text()) if (start / META).is_file() else None
            cfg, self.resized = fit_world(cfg, meta, saved_config(start / CONFIG_FILE), self.dist.world_size)
        return cfg

    def build_engine(self) -> tuple[Any, Any]:
        """The task's model (seeded, under ZeRO-3's init context where it applies), its initial weights,
        then the DeepSpeed engine with AdamW and the warmup-cosine schedule."""
        torch.manual_seed(self.cfg.run.seed)
        with model_init_context(self.cfg):
            model = self.task.build_model()
        initial = self.task.initial_state()
        if initial is not None:  # e.g. a pretrained encoder under a fresh head
            load_full_state(model, initial)
        world, scale = self.dist.world_size, self.task.lr_scale
        engine, _, scheduler = build_engine(model, self.cfg, world, scale, universal=bool(self.resized))
        return engine, scheduler

    def restore(self) -> int:
        """Load the checkpoint picked by --resume (engine, RNG states, loader position, log); -> its step."""
        run, start, step = self.run_dir, self.start, 0
        if start is not None:  # its config was fetched by fit_world, before DeepSpeed loads weights
            check_resumed_model(start / CONFIG_FILE, self.cfg, self.ckpts.where(start))
            if self.resized:  # every rank's loader state: the rest of the epoch is re-sharded
                converter = converts(run.remote, self.cfg.run.stage_dir, self.dist.rank, self.dist.local_rank)
                step, states = load_resized(self.ckpts, self.engine, start, converter, self.tdist.barrier)
                left = self.loader.reshard([st["loader"] for st in states])
                self.say(
                    f"{self.resized}; epoch {left['epoch']}: {left['samples_left']} samples left, "
                    f"re-sharded into {left['batches']} batches per rank"
                )
            else:
                step, state = self.ckpts.load(self.engine, start)
                self.loader.load_state_dict(state["loader"])
            if run.remote and self.dist.rank == 0:
                run.download(LOG_FILE)  # uploaded before the checkpoint's commit: it reaches its step
            self.log.truncate(step)
            best = self.ckpts.read_best()
            self.ckpts.best = best if best and best["step"] <= step else None
            self.say(f"resumed from {self.ckpts.where(start)} at step {step}")
        elif run.remote:
            self.log.truncate(0)  # a stage can hold the log of an earlier run at this URL
        if self.cfg.run.sample_log:  # every rank's sample log, also those of ranks this run lacks
            if self.dist.rank == 0:
                truncate_samples(self.out, step)
            self.tdist.barrier()
        if step > self.cfg.run.steps:
            raise CheckpointError(
                f"{self.ckpts.where(start)} is at step {step}, past run.steps={self.cfg.run.steps}"
            )
        return step

    # --- run --------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to run.steps, export, write the summary; -> the summary (rank 0's figures)."""
        cfg, dist = self.cfg, self.dist
        n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in self.engine.module.parameters())
        peak_lr = effective_lr(cfg.optim, global_batch(cfg, dist.world_size))
        accum = f" x {cfg.data.grad_accum} accumulated" if cfg.data.grad_accum > 1 else ""
        self.say(
            f"lvmae train {self.task.name}: {n_params / 1e6:.2f} M parameters, {dist.world_size} rank(s), "
            f"ZeRO-{cfg.run.zero_stage}, {self.precision}, {self.device.type}, batch {cfg.data.batch_size}"
            f"/rank{accum}, peak lr {peak_lr:.3g}, steps {self.step} -> {cfg.run.steps}, out {self.run_dir}"
        )
        self.started, self.first_step = time.perf_counter(), self.step
        # decoding the next batches overlaps this step
        batches = prefetch(iter(self.loader), depth=READ_AHEAD_BATCHES)
        try:
            if self.step == 0 and self.health is not None:  # the random-init figure
                self.log.write({"step": 0, "eval": self.evaluate()})
            while self.step < cfg.run.steps:
                t0 = time.perf_counter()
                group, outage = next_batches(batches, cfg.data.grad_accum)
                # every rank learns of an outage before the step's collectives
                if not every_rank_has(self.tdist, outage is None, self.device):
                    self.stop_for_outage(outage, batches)
                record = self.train_step(group, data_wait_s=time.perf_counter() - t0)
                stop, best = self.preemption.agreed(self.tdist, self.device), None
                if not stop and self.health is not None and self.health.due(self.step, cfg.run.steps):
                    record["eval"] = self.evaluate()
                    best = self.beats_best(record["eval"])
                self.log_step(record, group)
                if stop:
                    self.stop_for_preemption(batches)
                every = cfg.run.checkpoint_every
                if (every and self.step % every == 0) or self.step == cfg.run.steps or best:
                    self.save_checkpoint()
                if best:
                    self.ckpts.set_best(best)
        finally:
            batches.close()
            self.log.close()
            self.samples.close()
            self.preemption.restore()
        return self.finish(time.perf_counter() - self.started)

    def train_step(self, group: list[dict[str, Any]], data_wait_s: float) -> dict[str, Any]:
        """One optimizer step on `group` (data.grad_accum micro batches); -> its log record (loss and figures
        averaged over micro batches and ranks)."""
        t1 = time.perf_counter()
        dist, engine, n = self.dist, self.engine, len(group)
        lr = self.scheduler.get_last_lr()[0]
        loss_sum, figures = torch.zeros(1), {}
        for i, batch in enumerate(group):
            video = video_to(batch["video"], self.device, self.dtype)  # uint8 batches are converted there
            # micro batch i of rank r draws its masks as rank r x n + i of a run without accumulation would
            seed = step_seed(self.cfg.run.seed, self.step, dist.rank * n + i)
            loss = self.task.loss(engine, batch, video, torch.Generator().manual_seed(seed), self.step)
            engine.backward(loss)  # DeepSpeed scales it by 1 / accumulation steps
            engine.step()  # the optimizer steps at the last micro batch
            loss_sum = loss_sum.to(loss.device) + loss.detach().float().reshape(1) / n
            for key, value in self.task.step_metrics().items():
                figures[key] = figures.get(key, 0.0) + value / n
        self.step += 1
        self.tdist.all_reduce(loss_sum)  # sync point: every rank's loss, for one curve of the run
        grad_norm = engine.get_global_grad_norm()
        if figures:  # averaged over ranks, like the loss
            values = torch.tensor(list(figures.values()), dtype=torch.float32, device=loss_sum.device)
            self.tdist.all_reduce(values)
            figures = dict(zip(figures, (values / dist.world_size).tolist()))
        self.loader_state = group[-1]["state"]  # the loader reads ahead; this is where this step's data ended
        keys = [key for batch in group for key in batch["keys"]]
        self.samples.write({"step": self.step, "epoch": group[-1]["epoch"], "keys": keys})
        return {
            "step": self.step,
            "loss": loss_sum.item() / dist.world_size,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples": len(keys) * dist.world_size,
            "data_wait_s": round(data_wait_s, 6),
            "compute_s": round(time.perf_counter() - t1, 6),
            "epoch": group[-1]["epoch"],
            **figures,
        }

    def log_step(self, record: dict[str, Any], group: list[dict[str, Any]]) -> None:
        """The step's metrics (Prometheus), its line in train_log.jsonl, and a progress line now and then."""
        cfg, n, loss = self.cfg, sum(len(batch["keys"]) for batch in group), record["loss"]
        wait, compute = record["data_wait_s"], record["compute_s"]
        self.metrics.step(
            samples=n,
            tokens=n * self.task.tokens_per_sample,
            data_wait_s=wait,
            compute_s=compute,
            loss=loss,
            lr=record["lr"],
            grad_norm=record["grad_norm"],
            accuracy=record.get("accuracy"),
        )
        st = self.loader.stats
        self.metrics.loader(
            queue_depth=int(st["queue_depth"]),
            frames=int(st["frames"]),
            read_bytes=int(st["bytes_read"]),
            retries=int(st["retries"]),
            errors=int(st["bad_shards"]),
            skipped=int(st["skipped"]),
        )
        self.log.write(record)
        if not np.isfinite(loss):
            self.say(f"step {self.step}: the loss is {loss} (counted in lvmae_train_nonfinite_loss_total)")
        if self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps:
            elapsed = time.perf_counter() - self.started
            rate = (self.step - self.first_step) * global_batch(cfg, self.dist.world_size)
            self.say(
                f"step {self.step}/{cfg.run.steps}  loss {loss:.4f}  lr {record['lr']:.2e}  "
                f"{rate / max(elapsed, 1e-9):.1f} clips/s  "
                f"data wait {100 * wait / max(wait + compute, 1e-9):.0f}%  "
                f"peak {peak_memory_bytes()[1] / 2**30:.2f} GiB"
            )

    def evaluate(self) -> dict[str, Any]:
        """Collective: the health probe's figures now (train.health), said and exported by rank 0."""
        assert self.health is not None
        record = self.health.evaluate(self.engine, self.device, self.dtype)
        if self.dist.rank == 0:
            self.metrics.eval(record)
        self.say(eval_line(self.step, record))
        return record

    def beats_best(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """With run.keep_best: best.json's content when this step's probe beats the best so far."""
        best = self.ckpts.best
        if not self.cfg.run.keep_best or (best is not None and record["knn_top1"] <= best["knn_top1"]):
            return None
        return {"step": self.step, "checkpoint": step_name(self.step), **record}

    def _save(self) -> Path:
        """Collective: a checkpoint of this step (engine, RNG states, the loader's position, the log)."""
        rank_state = {"loader": self.loader_state, "step": self.step}
        path = self.ckpts.save(self.engine, self.step, rank_state, self.config_yaml, run_files=(LOG_FILE,))
        if self.cfg.run.sample_log and self.run_dir.remote:  # each rank's own, beside the checkpoint
            self.samples.flush()
            self.run_dir.upload(self.samples.path.relative_to(self.out).as_posix())
        self.saved = self.step
        return path

    def save_checkpoint(self) -> None:
        """Collective: _save, counted in the metrics and said."""
        path = self._save()
        uploaded = f" (uploaded in {self.ckpts.upload_seconds:.2f} s)" if self.run_dir.remote else ""
        self.metrics.checkpoint(upload_s=self.ckpts.upload_seconds)
        self.say(f"checkpoint {self.ckpts.where(path)}{uploaded}")

    def stop_for_outage(self, outage: StoreUnavailable | None, batches: Any) -> None:
        """Every rank is here, between steps, because one loader gave up on the store: save a checkpoint
        if this step has none (the run folder may be on the same unreachable store), cancel the reads
        still waiting, end the reader threads, and raise StoreOutage."""
        saved_now = ""
        if self.saved < self.step:
            try:
                saved_now = f"checkpoint {self.ckpts.where(self._save())} saved"
            except Exception as err:
                saved_now = f"no checkpoint could be saved ({type(err).__name__}: {err})"
        self.loader.retry.cancel()  # reads still waiting for the store give up now, and end their threads
        batches.close()
        join_readers(timeout=60)
        kept = saved_now or (
            f"the checkpoint of step {self.saved} stays" if self.saved >= 0 else "no checkpoint yet"
        )
        raise StoreOutage(outage_message(outage, self.dist.rank, self.step, kept))

    def stop_for_preemption(self, batches: Any) -> None:
        """Every rank is here, after the same step, because one was signalled: save this step, end the
        readers, and raise Preempted (lvmae exits 75, for a requeue)."""
        where = self.ckpts.where(
            self._save() if self.saved < self.step else self.ckpts.dir / step_name(self.step)
        )
        batches.close()
        join_readers(timeout=60)
        p, grace = self.preemption, self.cfg.run.preempt_grace_s
        raise Preempted(preempted_message(p.signal, self.step, where, p.waited(), grace))

    def finish(self, seconds: float) -> dict[str, Any]:
        """Collective: export the trained weights (rank 0 writes them), write summary.json, leave the
        process group; -> the summary."""
        run, dist, cfg = self.run_dir, self.dist, self.cfg
        state = export_state_dict(self.engine)  # collective
        exported = None
        if dist.rank == 0:
            exported = self.task.export(state, self.out)
            if run.remote:
                run.upload_tree(exported.relative_to(self.out).as_posix())
            print(f"exported {run.where(exported)}", flush=True)
        self.tdist.barrier()
        trained = self.step - self.first_step
        summary = {
            "task": self.task.name,
            "steps": self.step,
            "trained_steps": trained,
            "seconds": round(seconds, 2),
            "clips_per_s": round(trained * global_batch(cfg, dist.world_size) / max(seconds, 1e-9), 2),
            "export": run.where(exported) if exported else None,
            "peak_memory": dict(zip(("kind", "bytes"), peak_memory_bytes())),
            "loader": dict(self.loader.stats),
        }
        if self.health is not None and dist.rank == 0:  # the log holds every eval, also before a resume
            evals = eval_records(read_log(self.out / LOG_FILE))
            summary["eval"] = {"first": evals[0], "last": evals[-1], "best": self.ckpts.best}
        if dist.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            for rel in (LOG_FILE, "summary.json"):
                if (self.out / rel).is_file():
                    run.upload(rel)
        self.tdist.destroy_process_group()
        return summary


def train(task: Task, cfg: Any, resume: str = "none") -> dict[str, Any]:
    """Run (or continue) one training run on this rank; -> a summary (rank 0's figures)."""
    return Trainer(task, cfg, resume).run()
