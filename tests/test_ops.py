"""ops/: alert rules through promtool, and the dashboard against a real Prometheus scraping the exporter."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from train_data import tiny_mae_args

from train.dist import free_port
from train.metrics import TrainMetrics, write_targets

OPS = Path(__file__).resolve().parents[1] / "ops"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{tool} not installed (apt-get install prometheus)")
    return path


def dashboard_queries() -> list[str]:
    dash = json.loads((OPS / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def concrete(expr: str) -> str:
    """A dashboard query as Prometheus runs it once Grafana fills in its variables."""
    return expr.replace('"$run"', '".*"').replace("$__rate_interval", "15s")


def exercised_metrics() -> TrainMetrics:
    m = TrainMetrics(rank=0)
    m.step(samples=4, tokens=4 * 128, data_wait_s=0.01, compute_s=0.2, loss=1.5, lr=1e-3, grad_norm=0.7)
    m.loader(queue_depth=2, frames=64, read_bytes=1000, retries=0, errors=0, skipped=0)
    m.eval({"split": "val", "knn_top1": 0.5, "feature_spread": 0.1, "effective_rank": 4.2})
    return m


def test_alert_rules_pass_promtool():
    promtool = need("promtool")
    for args in (
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
        ["check", "config", "prometheus.yml"],
    ):
        run = subprocess.run([promtool, *args], cwd=OPS, capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stdout + run.stderr


def test_every_dashboard_and_alert_metric_is_exported():
    text = generate_latest(exercised_metrics().registry).decode()
    # prometheus-client adds a *_created timestamp per counter: not a figure anybody charts.
    exported = {n for n in re.findall(r"^(lvmae_\w+?)(?:\{| )", text, re.M) if not n.endswith("_created")}
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())
    exprs = dashboard_queries() + [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {name for e in exprs for name in re.findall(r"lvmae_\w+", e)}
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"
    # ... and the dashboard shows every figure the exporter has.
    assert exported <= {n for e in dashboard_queries() for n in re.findall(r"lvmae_\w+", e)} | {
        "lvmae_train_last_step_timestamp_seconds"  # used by the stall alert
    }


def test_file_sd_targets_name_every_rank_of_a_node(tmp_path):
    path = write_targets(tmp_path, "run7", [9402, 9403], host="node1", first_rank=2, name="run7-node1")
    assert path == tmp_path / "prometheus-targets" / "run7-node1.json"
    assert json.loads(path.read_text()) == [
        {"targets": ["node1:9402"], "labels": {"run": "run7", "rank": "2"}},
        {"targets": ["node1:9403"], "labels": {"run": "run7", "rank": "3"}},
    ]
    assert [p.name for p in path.parent.iterdir()] == ["run7-node1.json"]  # no temporary left


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def start_prometheus(tmp_path: Path, targets_dir: Path) -> tuple[subprocess.Popen, int]:
    """Debian's Prometheus on loopback with ops/prometheus.yml (1 s scrapes) reading `targets_dir`."""
    prometheus = need("prometheus")
    config = yaml.safe_load((OPS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(OPS / "alerts.yml")]
    config["scrape_configs"][0]["file_sd_configs"] = [
        {"files": [str(targets_dir / "*.json")], "refresh_interval": "1s"}
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = free_port()
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 (lives as long as the server)
    )  # fmt: skip
    return proc, web


def test_prometheus_scrapes_a_real_training_run_and_the_dashboard_gets_data(
    tmp_path, train_data, colour_data
):
    """Two ranks of `lvmae train mae` (torchrun) with their exporters on and the in-run probe on a labelled
    data set (the colour clips, cut to the run's 8 frames); Prometheus finds them through the file-SD list
    the run writes, and every dashboard query returns data while the run trains."""
    runs = tmp_path / "runs"
    prom, web = start_prometheus(tmp_path, runs / "prometheus-targets")
    base = free_port(pair=True)  # ranks 0 and 1 serve on base and base + 1
    args = tiny_mae_args(
        train_data,
        runs / "monitored",
        "optim.total_steps=1000000",
        "run.steps=1000000",
        "run.checkpoint_every=0",
        f"run.metrics_port_base={base}",
        "eval.every=200",
        f"eval.data={colour_data / 'data'}",
        "eval.split=test",
    )
    cmd = [sys.executable, "-m", "lvmae_cli", "launch", "--launcher=torchrun", "--nproc=2"]
    cmd += [f"--master-port={free_port()}", "--", *args]
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115 (lives as long as the run)
    train = subprocess.Popen(cmd, cwd=OPS.parent, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, missing = time.monotonic() + 180, ["(not scraped yet)"]
        while time.monotonic() < deadline and train.poll() is None:
            time.sleep(1)
            try:
                up = query(web, 'up{job="lvmae"} == 1')
                # Every rank scraped after its first steps (a gauge reads 0 before any step).
                if len(up) < 2 or len(query(web, "lvmae_train_steps_total > 2")) < 2:
                    continue
                missing = [e for e in dashboard_queries() if not query(web, concrete(e))]
            except (OSError, KeyError):
                continue
            if not missing:
                break
        assert train.poll() is None, "the run stopped:\n" + (tmp_path / "train.log").read_text()[-3000:]
        assert not missing, (
            f"no data for dashboard queries {missing}\n" + (tmp_path / "prometheus.log").read_text()[-2000:]
        )
        up = query(web, 'up{job="lvmae"}')
        assert sorted((t["metric"]["run"], t["metric"]["rank"]) for t in up) == [
            ("monitored", "0"),
            ("monitored", "1"),
        ]
        assert all(t["value"][1] == "1" for t in up)
        rate = 'sum(rate(lvmae_train_samples_total{run=~"$run"}[$__rate_interval]))'
        assert float(query(web, concrete(rate))[0]["value"][1]) > 0
        loss = query(web, "lvmae_train_loss")
        values = {t["metric"]["rank"]: float(t["value"][1]) for t in loss}
        assert len(values) == 2 and all(0 < v < 10 for v in values.values()), values
    finally:
        train.terminate()  # lvmae launch passes SIGTERM on to torchrun, which stops the ranks
        try:
            train.wait(timeout=60)
        except subprocess.TimeoutExpired:
            train.kill()
        log.close()
        prom.terminate()
        prom.wait(timeout=20)
