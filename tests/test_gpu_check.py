"""bench/gpu_check.sh's CPU fallback (`--device cpu --quick`): every section runs and reports, so the script
is ready, not rotten, when a session is lent a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    run = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    path = out / "gpu_check_cpu.json"
    assert path.is_file(), run.stdout[-3000:]
    assert (out / "gpu_check_cpu.log").is_file()
    return json.loads(path.read_text())


@pytest.mark.slow
def test_every_section_reports_without_error(report):
    sections = report["sections"]
    assert list(sections) == ["env", "step", "train", "tokenizer"]
    for name, rec in sections.items():
        assert "error" not in rec, f"{name}: {rec.get('error')}\n{rec.get('traceback', '')}"
        assert 0 < rec["seconds"] <= rec["budget_s"] + 30, name
    assert report["failed_sections"] == []
    env = sections["env"]
    assert env["device"] == "cpu" and env["bf16_matmul_ok"] and env["matmul"]["tflops_per_s"] > 0
    assert env["decoder_used"] == "pyav"
    assert env["packages"]["deepspeed"]["version"]


@pytest.mark.slow
def test_step_figures_beside_the_plan(report):
    step = report["sections"]["step"]
    runs = step["runs"]
    assert {(r["decoder"], r["batch"]) for r in runs} == {
        (d, b) for d in ("all", "0.5", "0.15") for b in (1, 2)
    }
    for r in runs:
        assert "error" not in r and "skipped" not in r, r
        assert r["step_s"] > 0 and r["flops_total"] > r["flops_forward"] > 0
        # The plan counts saved activations exactly (fp32 on a CPU: the same kernels' saves)
        assert r["saved_activation_bytes"] == pytest.approx(r["plan_saved_bytes"], rel=0.10), r
        assert r["plan_model_matches"], r
        assert r["plan_decoded"] == r["decoded"]
        assert r["plan_peak_increase_bytes"] > r["plan_saved_bytes"]
    by = {(r["decoder"], r["batch"]): r for r in runs}
    assert by[("0.15", 1)]["decoded"] < by[("0.5", 1)]["decoded"] < by[("all", 1)]["decoded"]
    assert by[("0.15", 2)]["saved_activation_bytes"] < by[("all", 2)]["saved_activation_bytes"]
    engine = step["engine"]
    assert "error" not in engine, engine
    assert engine["median_step_s"] > 0 and engine["plan_total_bytes"] > 0


@pytest.mark.slow
def test_train_and_tokenizer_rates(report):
    sec = report["sections"]["train"]
    assert sec["ingest_clips"]["clips"] > 0
    assert sec["ingest_tokens"]["clips_per_s"] > 0
    train = sec["train"]
    assert train["steps_logged"] == 6 and train["steps_counted"] == 4
    assert train["steps_per_s"] > 0 and train["clips_per_s"] > 0
    assert 0.0 <= train["data_wait_share"] <= 1.0
    tok = report["sections"]["tokenizer"]
    assert tok["clips_per_s"] > 0
    assert tok["ingest_tokens_clips_per_s"] == sec["ingest_tokens"]["clips_per_s"]
