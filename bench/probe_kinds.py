"""Which probe tells a pretrained encoder from a random one? k-NN and linear probes on pooled features.

On a demo folder (`make demo`: DATA = demo-out/data, EXPORT = demo-out/runs/mae/export), the trained
encoder and a random-init one of the same config (seed 0) encode the train, val and test clips; each
clip's tokens are mean-pooled over space and over 1 or 4 equal spans of time (concatenated). Then:
- knn: the in-run health probe's k-NN (train.health.knn_top1: centred cosine, k = 20), bank = train;
- linear: multinomial logistic regression (L-BFGS, L2 1e-3) on the channel-standardised features.
Against them, read the attentive probe's figures in the demo's summary (`lvmae eval probe`).

    .venv/bin/python bench/probe_kinds.py [--demo demo-out]

Writes bench/results/probe_kinds.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lvmae.mae import MaskedVideoAutoencoder  # noqa: E402
from lvmae.weights import load_mae  # noqa: E402
from train.health import effective_rank, knn_top1  # noqa: E402
from train.loader import ClipLoader  # noqa: E402


def clips(data: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    loader = ClipLoader(data, 8, split=split, labels=True, shuffle_buffer=0, epochs=1, drop_last=False)
    batches = list(loader)
    return torch.cat([b["video"] for b in batches]), torch.cat([b["labels"] for b in batches])


def pooled(tokens: torch.Tensor, grid: tuple[int, int, int], spans: int) -> torch.Tensor:
    t, h, w = grid
    per_time = tokens.reshape(tokens.shape[0], t, h * w, -1).mean(2)  # (B, T', D)
    return torch.cat([c.mean(1) for c in per_time.chunk(spans, 1)], 1)


def linear_top1(x: torch.Tensor, y: torch.Tensor, q: torch.Tensor, qy: torch.Tensor, classes: int) -> float:
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, q = (x - mu) / sd, (q - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((q @ w + b).argmax(1) == qy).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", default="demo-out")
    args = parser.parse_args()
    demo = Path(args.demo)
    data = str(demo / "data")
    split = {s: clips(data, s) for s in ("train", "val", "test")}
    classes = int(split["train"][1].max()) + 1
    trained = load_mae(demo / "runs" / "mae" / "export")
    torch.manual_seed(0)
    encoders = {"random_init": MaskedVideoAutoencoder(trained.cfg), "trained": trained}
    rows = []
    for name, model in encoders.items():
        model.eval()
        with torch.no_grad():
            tokens = {s: torch.cat([model.encoder(x) for x in v.split(8)]) for s, (v, _) in split.items()}
        for spans in (1, 4):
            f = {s: pooled(t, model.cfg.video.grid, spans) for s, t in tokens.items()}
            row = {
                "encoder": name,
                "time_spans": spans,
                "effective_rank_test": round(effective_rank(f["test"]), 2),
            }
            for s in ("val", "test"):
                y = split[s][1]
                row[f"knn_{s}"] = round(knn_top1(f["train"], split["train"][1], f[s], y, 20, classes), 4)
                row[f"linear_{s}"] = round(linear_top1(f["train"], split["train"][1], f[s], y, classes), 4)
            print(row, flush=True)
            rows.append(row)
    summary = json.loads((demo / "summary.json").read_text()) if (demo / "summary.json").is_file() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    out = {
        "bench": "probe_kinds",
        "commit": commit.stdout.strip(),
        "demo": str(demo),
        "clips": {s: len(v[1]) for s, v in split.items()},
        "attentive_probe_test_top1": summary.get("probe"),
        "rows": rows,
    }
    path = ROOT / "bench" / "results" / "probe_kinds.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
