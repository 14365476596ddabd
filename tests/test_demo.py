"""`make demo` end to end, with few steps: generated labelled videos, ingest, tokenizer, tokens, LVMAE on
128-frame clips on 2 ZeRO-3 processes with a resume and the health probe inside the run, the probe
against a random-init encoder, the summary and the figures; on the local store and on a local S3 server."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.runlog import read_log

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_demo_runs_end_to_end_with_few_steps(tmp_path, store):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lvmae_cli.demo", "--out", str(out), "--store", store]
    cmd += ["--videos", "24", "--tokenizer-steps", "4", "--mae-steps", "6", "--probe-epochs", "2"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips"] == 24  # one 128-frame clip per generated video
    assert summary["clips_per_split"] == {"train": 16, "val": 2, "test": 6}  # by video, per class
    probe = summary["probe"]
    assert probe["task"] == "order" and probe["num_test_clips"] == 6 and probe["chance"] == 0.5
    assert 0 <= probe["pretrained_top1"] <= 1 and 0 <= probe["random_init_top1"] <= 1
    # the pretrained encoder exports to transformers' VideoMAEModel with the same features
    assert summary["hf_export"]["max_abs_diff"] < 1e-4, summary["hf_export"]
    assert "probe on `order` (6 held-out test clips" in run.stdout
    # A priority that does not follow motion is said so, with where to read why.
    follows = summary["tokenizer_eval"]["priority"]["frame_diff_spearman"] >= 0.3
    assert follows != ("has not learned to follow motion yet" in run.stdout)
    assert summary["store"] == (str(out / "data") if store == "local" else "s3://lvmae-demo/data")
    art = summary["artefacts"]
    if store == "local":
        assert (out / "data" / "index.json").is_file()
        assert (out / "data" / "tokens" / summary["tokenizer_id"] / "zarr.json").is_file()
    assert (Path(art["mae_weights"]) / "model.safetensors").is_file()
    assert (Path(art["tokenizer"]) / "config.json").is_file()
    assert Path(art["figure"]).stat().st_size > 10_000
    assert Path(art["probe_examples"]).stat().st_size > 10_000
    # The LVMAE run stopped at its half-way checkpoint and resumed from it: each step logged once.
    mae_log = read_log(out / "runs" / "mae" / "train_log.jsonl")
    assert [r["step"] for r in mae_log] == [0, 1, 2, 3, 4, 5, 6]  # step 0: the random-init eval's line
    # The health probe ran in the run (every step here: 6 steps / 6), before and after the resume.
    assert [r["step"] for r in mae_log if "eval" in r] == [0, 1, 2, 3, 4, 5, 6]
    ev = summary["in_run_eval"]
    assert ev["steps"] == [0, 1, 2, 3, 4, 5, 6] and ev["clips"] == [16, 2] and ev["split"] == "val"
    assert ev["best"]["step"] >= 1 and ev["best"]["knn_top1"] == max(ev["knn_top1"][1:])
    assert (out / "runs" / "mae" / "checkpoints" / ev["best"]["checkpoint"] / "meta.json").is_file()
    assert Path(art["eval_curve"]).stat().st_size > 10_000
    assert "in-run health probe (k-NN on 2 val clips" in run.stdout
    assert "resumed from" in run.stdout and "step-00000003 at step 3" in run.stdout
    assert "metrics live at http://127.0.0.1:" in run.stdout and "lvmae_train_steps_total" in run.stdout
    targets = json.loads((out / "runs" / "prometheus-targets" / "mae.json").read_text())
    assert [t["labels"]["rank"] for t in targets] == ["0", "1"]
    # Credentials of the S3 server reach the processes through the environment only.
    saved = (out / "runs" / "mae" / "config.yaml").read_text() + (out / "summary.json").read_text()
    assert "AWS_SECRET" not in saved and "secret" not in saved.lower()
