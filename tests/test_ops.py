"""ops/: alert rules through promtool, and the dashboard against a real Prometheus scraping the exporter."""

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

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
    return expr.replace('"$run"', '".*"').replace("$__rate_interval", "10s")


def exercised_metrics() -> TrainMetrics:
    m = TrainMetrics(rank=0)
    m.step(samples=4, tokens=4 * 128, data_wait_s=0.01, compute_s=0.2, loss=1.5, lr=1e-3, grad_norm=0.7)
    m.loader(queue_depth=2, frames=64, read_bytes=1000, retries=0, errors=0, skipped=0)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_exporter_and_the_dashboard_gets_data(tmp_path):
    prometheus = need("prometheus")
    metrics, port = exercised_metrics(), free_port()
    metrics.serve(port)
    runs = tmp_path / "runs"
    write_targets(runs, "test-run", [port])
    config = yaml.safe_load((OPS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(OPS / "alerts.yml")]
    config["scrape_configs"][0]["file_sd_configs"] = [
        {"files": [str(runs / "prometheus-targets" / "*.json")], "refresh_interval": "1s"}
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = free_port()
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 (lives as long as the server)
    )  # fmt: skip
    stop = threading.Event()

    def train():  # a step every 100 ms, as a (very fast) training run would
        n = 1
        while not stop.is_set():
            n += 1
            metrics.step(
                samples=4, tokens=512, data_wait_s=0.01, compute_s=0.09, loss=1.0 / n, lr=1e-3, grad_norm=0.5
            )
            metrics.loader(
                queue_depth=n % 3, frames=64 * n, read_bytes=1000 * n, retries=0, errors=0, skipped=0
            )
            time.sleep(0.1)

    worker = threading.Thread(target=train, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                up = query(web, 'up{job="lvmae"}')
                if (
                    up
                    and up[0]["value"][1] == "1"
                    and len(query(web, "lvmae_train_steps_total[20s]")[0]["values"]) >= 4
                ):
                    break
            except (OSError, IndexError, KeyError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail(
                "Prometheus never scraped the exporter:\n" + (tmp_path / "prometheus.log").read_text()[-2000:]
            )
        up = query(web, 'up{job="lvmae"}')[0]
        assert up["metric"]["run"] == "test-run" and up["metric"]["rank"] == "0"
        for expr in dashboard_queries():
            assert query(web, concrete(expr)), f"no data for dashboard query {expr}"
        assert (
            float(
                query(web, concrete('sum(rate(lvmae_train_samples_total{run=~"$run"}[$__rate_interval]))'))[
                    0
                ]["value"][1]
            )
            > 0
        )
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=20)
