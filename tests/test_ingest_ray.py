"""`--executor ray`: the same clip data set and token store as the local executor, on a two-node Ray cluster
started here (on 127.0.0.1 only), through a worker killed mid-shard, and resumed after a partial run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_ingest_tokens import tok_cfg
from videos import write_ramp_video

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.tokens import ingest_tokens
from lvmae.tokenizer import Tokenizer, save_tokenizer
from lvmae_cli.main import main as lvmae_main

FRAMES, SIZE, PER_SHARD = 16, 32, 3
SECRET = "lvmae-test-secret-0f3c9a"  # must show up in no output and no Ray log
# Ray's socket paths (TEMP/session_<date>_<pid>/sockets/plasma_store) must fit AF_UNIX's 107 bytes.
_MAX_TEMP_DIR = 107 - len("/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")


def keep_loopback(ray_params, head) -> None:
    """RAY_START_HOOK of the worker node: `ray start` turns 127.0.0.1 into the machine's routable address,
    where the loopback-only head does not listen (the head keeps 127.0.0.1 through
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which a worker node refuses). Runs inside `ray start` only."""
    import ray._private.services as services

    services.resolve_ip_for_localhost = lambda host: host


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_until(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def _port_open(port: int) -> bool:
    with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each `ray start --block` (it stops the processes it started), then SIGKILL any of their
    descendants still alive; only processes this fixture started are touched."""
    import psutil

    family = []
    for proc in procs:
        with suppress(psutil.Error):
            family += psutil.Process(proc.pid).children(recursive=True)
    for proc in reversed(procs):
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(family, timeout=10)
    for child in alive:
        with suppress(psutil.Error):
            child.kill()


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory) -> Iterator[Path]:
    """Ray's settings while this module runs, here and in the nodes it starts: no usage stats, no token
    authentication (a token file in ~/.ray would switch it on for some of them only), temporary files
    below a short directory of this test run (AF_UNIX paths) -> that directory; a local Ray uses local/."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install lvmae[ray])")
    temp = tmp_path_factory.mktemp("ray")
    own_temp = len(str(temp / "local/ray")) > _MAX_TEMP_DIR
    if own_temp:
        temp = Path(tempfile.mkdtemp(prefix="lvmae-ray-", dir="/tmp"))
    (temp / "local").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_TMPDIR", str(temp / "local"))
        mp.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)  # the executor sets it: undone after
        yield temp
    if own_temp:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(ray_env) -> Iterator[dict]:
    """A head and a worker node (2 logical CPUs each) joined through `ray start` on 127.0.0.1."""
    temp = ray_env
    port = _free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    common = ["--block", f"--temp-dir={temp}", "--num-cpus=2", "--object-store-memory=100000000"]
    common += ["--disable-usage-stats"]
    env = {**os.environ, "TMPDIR": str(temp / "tmp")}  # a killed worker's lvmae-shard-* stays in here
    (temp / "tmp").mkdir()
    head_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    worker_env = {**env, "RAY_START_HOOK": f"{__name__}.keep_loopback", "PYTHONPATH": path}
    procs: list[subprocess.Popen] = []
    try:
        head = [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}"]
        head += ["--include-dashboard=false", *common]
        procs.append(_start(head, head_env, temp / "head.log"))
        _wait_until(lambda: _port_open(port), procs[0], "the Ray head", temp / "head.log")
        worker = [ray_cli, "start", f"--address=127.0.0.1:{port}", *common]
        procs.append(_start(worker, worker_env, temp / "worker.log"))

        def joined() -> bool:
            return b"Ray runtime started" in (temp / "worker.log").read_bytes()

        _wait_until(joined, procs[1], "the Ray worker node", temp / "worker.log")
        yield {"address": f"127.0.0.1:{port}", "temp": temp, "procs": procs}
    finally:
        _stop(procs)


def clip_cfg(**kw) -> IngestConfig:
    return IngestConfig(clip=ClipSpec(num_frames=kw.pop("frames", FRAMES), size=kw.pop("size", SIZE)), **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Four short generated videos: 3 + 3 + 4 + 4 clips of 16 frames, in shards of 3 (5 shards)."""
    src = tmp_path_factory.mktemp("src")
    for i, frames in enumerate((48, 56, 64, 72)):
        write_ramp_video(src / f"v{i}.mp4", frames)
    return src


@pytest.fixture(scope="module")
def local_clips(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "ds"
    summary = ingest_clips([str(corpus)], str(out), clip_cfg(shard_clips=PER_SHARD), progress=False)
    assert (summary.num_samples, summary.shards) == (14, 5)
    return out


@pytest.mark.slow
def test_clips_on_ray_are_byte_identical_and_leak_no_secret(
    ray_cluster, corpus, local_clips, tmp_path, monkeypatch, capfd
):
    out = tmp_path / "ds"
    argv = ["ingest", "clips", str(corpus), "--out", str(out), "--frames", str(FRAMES), "--size", str(SIZE)]
    argv += ["--shard-clips", str(PER_SHARD), "--quiet", "--executor", "ray"]
    argv += ["--ray-address", ray_cluster["address"], "--storage-options", json.dumps({"token": SECRET})]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert lvmae_main(argv) == 0
    printed = "".join(capfd.readouterr())  # this process's stdout and stderr, Ray's forwarded logs included
    assert tree_bytes(out) == tree_bytes(local_clips)
    assert "data set complete: 14 clips" in printed and SECRET not in printed
    logs = [p for p in ray_cluster["temp"].rglob("*") if p.is_file()]
    assert logs and not [p for p in logs if SECRET.encode() in p.read_bytes()]


def _kill_first_shard_task(raylet_parents: list[int], outcome: dict, stop: threading.Event) -> None:
    """Poll our cluster's workers; SIGKILL the first one whose process title says it runs write_shard."""
    import psutil

    while not stop.is_set():
        for parent in raylet_parents:
            with suppress(psutil.Error):
                for proc in psutil.Process(parent).children(recursive=True):
                    with suppress(psutil.Error, OSError):
                        if proc.cmdline()[:1] == ["ray::write_shard"]:
                            proc.kill()
                            outcome["pid"] = proc.pid
                            return
        time.sleep(0.002)


@pytest.mark.slow
def test_a_worker_killed_mid_shard_gives_the_identical_data_set(ray_cluster, sample_videos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("bikes", "bigbuckbunny"):  # real videos: a shard takes long enough to be caught at work
        os.symlink(sample_videos[name], src / f"{name}.mp4")
    cfg = clip_cfg(frames=32, size=64, shard_clips=4)
    ref = tmp_path / "ref"
    ingest_clips([str(src)], str(ref), cfg, progress=False)
    outcome: dict = {}
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_first_shard_task, args=([p.pid for p in ray_cluster["procs"]], outcome, stop)
    )
    killer.start()
    try:
        out = tmp_path / "ray"
        summary = ingest_clips(
            [str(src)], str(out), cfg, progress=False, executor="ray", ray_address=ray_cluster["address"]
        )
    finally:
        stop.set()
        killer.join()
    assert "pid" in outcome, "no worker was caught running write_shard"
    import psutil

    assert not psutil.pid_exists(outcome["pid"])
    assert (summary.shards, summary.shards_skipped, summary.samples_written) == (3, 0, 11)
    assert tree_bytes(out) == tree_bytes(ref)
    # Ray's driver log says the task's worker died and the task went again (its wording since Ray 2.x).
    drivers = ray_cluster["temp"].glob("session_latest/logs/python-core-driver-*.log")
    assert any("WORKER_DIED" in log.read_text(errors="replace") for log in drivers)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> tuple[Path, str]:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tok")
    return d, save_tokenizer(Tokenizer(tok_cfg(FRAMES, SIZE)).eval(), d)


@pytest.fixture
def torch_threads() -> Iterator[int]:
    """Two torch threads here and in the actors (2 CPUs a node): CPU kernels sum in a thread-count order."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def read_store(root: Path, tid: str) -> tuple[dict[str, np.ndarray], dict]:
    group = zarr.open_group(str(root / "tokens" / tid), mode="r", zarr_format=3)
    return {name: group[name][:] for name in ("codes", "priority", "keys", "valid")}, dict(group.attrs)


@pytest.mark.slow
def test_tokens_on_ray_give_the_identical_store(
    ray_cluster, local_clips, tokenizer, torch_threads, tmp_path, capsys
):
    tok_dir, tid = tokenizer
    local, remote = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(local_clips, local)
    shutil.copytree(local_clips, remote)
    ingest_tokens(str(local), str(tok_dir), batch_size=2, device="cpu", progress=False)
    argv = ["ingest", "tokens", str(remote), "--tokenizer", str(tok_dir), "--batch-size", "2"]
    argv += ["--device", "cpu", "--quiet", "--executor", "ray", "--ray-address", ray_cluster["address"]]
    assert lvmae_main(argv) == 0
    # Two actors (one a node: 2 CPUs each, as many threads as this process's torch), writing concurrently.
    assert "on cpu, 2 Ray actors (2 threads each)" in capsys.readouterr().out
    ours, theirs = read_store(remote, tid), read_store(local, tid)
    for name, values in theirs[0].items():
        np.testing.assert_array_equal(ours[0][name], values, err_msg=name)
    assert ours[1] == theirs[1] and theirs[1]["complete"] is True and theirs[1]["num_samples"] == 14
    assert tree_bytes(remote / "tokens") == tree_bytes(local / "tokens")  # markers, errors.jsonl, every chunk


@pytest.mark.slow
def test_a_ray_run_skips_what_is_done(
    ray_cluster, ray_env, corpus, local_clips, tokenizer, torch_threads, tmp_path
):
    out = tmp_path / "ds"
    shutil.copytree(local_clips, out)
    for k in (1, 3):  # two shards lost before their records were written
        (out / f"shards/shard-00000{k}.json").unlink()
        (out / f"shards/shard-00000{k}.tar").unlink()
    (out / "index.json").unlink()
    # No --ray-address: a local Ray of --workers CPUs, on 127.0.0.1 only, started and stopped by the run.
    cfg = clip_cfg(shard_clips=PER_SHARD, workers=2)
    summary = ingest_clips([str(corpus)], str(out), cfg, progress=False, executor="ray")
    assert (summary.shards_skipped, summary.samples_written) == (3, 6)
    assert tree_bytes(out) == tree_bytes(local_clips)
    [session] = (ray_env / "local/ray").glob("session_2*")
    nodes = re.findall(r"node_address=(\S+)", (session / "logs/gcs_server.out").read_text())  # Ray's log
    assert nodes and set(nodes) == {"127.0.0.1"}

    tok_dir, tid = tokenizer
    ingest_tokens(str(out), str(tok_dir), batch_size=2, device="cpu", progress=False)
    full = tree_bytes(out / "tokens")
    (out / f"tokens/{tid}/_done/shard-000002.json").unlink()
    again = ingest_tokens(
        str(out), str(tok_dir), 2, "cpu", progress=False, executor="ray", ray_address=ray_cluster["address"]
    )
    assert (again.shards_skipped, again.clips, again.complete) == (4, 3, True)
    assert tree_bytes(out / "tokens") == full


def test_ray_executor_without_ray_is_one_clear_line(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like
    for argv in (
        ["ingest", "clips", str(corpus), "--out", str(tmp_path / "ds"), "--executor", "ray"],
        ["ingest", "tokens", str(tmp_path / "ds"), "--tokenizer", str(tmp_path), "--executor", "ray"],
    ):
        assert lvmae_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install lvmae[ray]" in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists()
    assert (
        lvmae_main(["ingest", "clips", str(corpus), "--out", str(tmp_path / "ds"), "--ray-address", "auto"])
        == 2
    )
    assert "--ray-address is for --executor ray" in capsys.readouterr().err
