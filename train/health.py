"""Is the encoder learning? A k-NN probe and collapse signals on frozen features, inside the run.

Every eval.every steps, at step 0 (the random-init figure) and at the last step, the trainer calls
`HealthProbe.evaluate`: the encoder (in eval mode, no masking, no gradients) encodes up to eval.max_clips
labelled clips of two splits of eval.data (cut at their centre to the model's length and size) (the memory bank, eval.train_split, and the held-out split,
eval.split); each clip's tokens are mean-pooled into one feature vector. Then, on every rank alike:

- `knn_top1`: a weighted k-NN classifier (cosine similarity after centring on the bank's mean, votes
  exp(sim / 0.07), as DINO's k-NN evaluation) scores the held-out clips: no training, seconds;
- `feature_spread`: the mean over dimensions of the std across held-out clips of the L2-normalised
  features, times sqrt(dim): about 1 for features spread over the sphere, 0 when every clip gets the same
  feature (collapse; SimSiam's collapse monitor, scaled);
- `effective_rank`: exp of the entropy of the normalised singular values of the centred features (Roy &
  Vetterli, 2007): how many directions the features really use (at most min(clips, dim)).

Work is shared between ranks: every rank reads the same clips (the loaders below are not split by rank)
and encodes every world_size-th batch, padded with a dummy batch to the same number of forwards (ZeRO-3
gathers parameters collectively in each forward); the pooled features are then gathered on every rank.
The figures depend on the weights only, not on the ranks or the batch size.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from lvmae.config import ConfigError

KNN_TEMPERATURE = 0.07


# --- the figures (pure) ---------------------------------------------------------------------------------


def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    labels: torch.Tensor,
    k: int = 20,
    num_classes: int | None = None,
) -> float:
    """Share of `queries` (Q, D) whose weighted k-NN vote among `bank` (N, D) gives their label."""
    bank, queries = bank.float(), queries.float()
    mean = bank.mean(0, keepdim=True)
    b, q = F.normalize(bank - mean, dim=1), F.normalize(queries - mean, dim=1)
    sim, idx = (q @ b.T).topk(min(k, len(b)), dim=1)  # (Q, k)
    c = num_classes or int(max(bank_labels.max(), labels.max())) + 1
    votes = torch.zeros(len(q), c).scatter_add_(1, bank_labels[idx], (sim / KNN_TEMPERATURE).exp())
    return float((votes.argmax(1) == labels).float().mean())


def feature_spread(x: torch.Tensor) -> float:
    """Mean per-dimension std across rows of the L2-normalised rows of x (N, D), times sqrt(D)."""
    z = F.normalize(x.float(), dim=1)
    return float(z.std(0, unbiased=False).mean() * math.sqrt(x.shape[1]))


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of x (N, D) centred: 1 for rank one, min(N, D) at most."""
    s = torch.linalg.svdvals(x.double() - x.double().mean(0, keepdim=True))
    if float(s.sum()) == 0.0:
        return 0.0  # every row the same: nothing spans any direction
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def health_figures(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    held: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    classes: int,
) -> dict[str, Any]:
    return {
        "knn_top1": round(knn_top1(bank, bank_labels, held, labels, k, classes), 4),
        "chance": round(1 / classes, 4),
        "feature_spread": round(feature_spread(held), 4),
        "effective_rank": round(effective_rank(held), 3),
        "dim": int(held.shape[1]),
        "clips": [len(bank), len(held)],
    }


# --- inside the run ------------------------------------------------------------------------------------


def split_size(counts: dict[str, dict[str, int]], split: str) -> int:
    return sum((counts.get(split) or {}).values())


class HealthProbe:
    """The eval.* section at work on one rank: its two loaders are built (and checked) once."""

    def __init__(self, cfg: Any, task: Any, dist: Any, loader_kwargs: dict[str, Any]):
        from train.loader import ClipLoader, LoaderError

        ev = cfg.eval
        self.cfg, self.task, self.dist = ev, task, dist
        url = ev.data or cfg.data.url
        self.loaders = {}
        for split in (ev.train_split, ev.split):
            try:
                self.loaders[split] = ClipLoader(
                    url,
                    cfg.data.batch_size,
                    shuffle_buffer=0,
                    epochs=1,
                    drop_last=False,
                    even_batches=False,
                    split=split,
                    labels=True,
                    **loader_kwargs,
                )
            except LoaderError as err:
                raise ConfigError(f"eval.data: {err}") from None
        first = self.loaders[ev.train_split]
        for split in (ev.train_split, ev.split):
            if not split_size(first.label_counts, split):
                raise ConfigError(f"eval: {url} has no labelled {split} clips (eval.train_split, eval.split)")
        if len(first.classes) < 2:
            raise ConfigError(f"eval.data: {url} has {len(first.classes)} class; the probe needs two or more")
        video, spec = cfg.model_config().video, first.spec
        self.frames, self.size = video.num_frames, video.img_size
        if spec["num_frames"] < self.frames or spec["size"] < self.size:
            raise ConfigError(
                f"eval.data: {url} holds {spec['num_frames']}-frame {spec['size']} px clips; the model takes "
                f"{self.frames} frames of {self.size} px (longer or larger clips are cut at their centre)"
            )
        self.url, self.classes = url, first.classes

    def due(self, step: int, last: int) -> bool:
        return step == 0 or step == last or step % self.cfg.every == 0

    def centre(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> the model's clip at its centre (frames x size x size)."""
        t, h, w = video.shape[2:]
        t0, y0, x0 = (t - self.frames) // 2, (h - self.size) // 2, (w - self.size) // 2
        return video[:, :, t0 : t0 + self.frames, y0 : y0 + self.size, x0 : x0 + self.size]

    @torch.no_grad()
    def _features(self, split: str, model: Any, device: torch.device, dtype: torch.dtype) -> tuple:
        """Collective: the pooled features (N, D) and labels (N,) of up to max_clips clips of `split`."""
        from train.decoders import video_to

        loader, rank, world = self.loaders[split], self.dist.rank, self.dist.world_size
        loader.load_state_dict({"epoch": 0, "consumed": 0, "batches": 0})
        feats, labels, taken, batches, last = [], [], 0, 0, None
        for batch in loader:
            n = min(len(batch["keys"]), self.cfg.max_clips - taken)
            if n <= 0:
                break
            if batches % world == rank:  # only this rank's batches go to the device
                video = video_to(self.centre(batch["video"][:n]), device, dtype)
                feats.append(self.task.features(model, video).float().cpu())
                labels.append(batch["labels"][:n])
            taken, batches, last = taken + n, batches + 1, batch["video"][:1]
        for _ in range(math.ceil(batches / world) - len(feats)):  # the same number of forwards on every
            self.task.features(model, video_to(self.centre(last), device, dtype))  # rank (ZeRO-3)
        mine = (torch.cat(feats) if feats else None, torch.cat(labels) if labels else None)
        if world == 1:
            return mine
        import torch.distributed as tdist

        gathered: list[Any] = [None] * world
        tdist.all_gather_object(gathered, mine)
        parts = [g for g in gathered if g[0] is not None]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def evaluate(self, model: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Collective: the figures of the model as it is now (its train/eval mode and RNG states restored)."""
        started, module = time.perf_counter(), getattr(model, "module", model)
        was_training = module.training
        module.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                bank, bank_labels = self._features(self.cfg.train_split, model, device, dtype)
                held, labels = self._features(self.cfg.split, model, device, dtype)
        finally:
            module.train(was_training)
        figures = health_figures(bank, bank_labels, held, labels, self.cfg.k, len(self.classes))
        return {**figures, "split": self.cfg.split, "seconds": round(time.perf_counter() - started, 2)}


def eval_line(step: int, r: dict[str, Any]) -> str:
    return (
        f"eval at step {step}: k-NN top-1 {100 * r['knn_top1']:.1f}% on {r['clips'][1]} {r['split']} clips "
        f"(chance {100 * r['chance']:.0f}%), feature spread {r['feature_spread']:.3f}, effective rank "
        f"{r['effective_rank']:.1f} of {r['dim']} ({r['seconds']:.1f} s)"
    )
