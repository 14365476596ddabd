"""`lvmae launch --launcher slurm` and ops/slurm/pretrain.sbatch on a real Slurm started here: munged,
slurmctld and slurmd (Debian's munge and slurm-wlm, `make tools`) on 127.0.0.1, one node with 2 CPUs,
configured and owned by the test; and the mapping of Slurm's variables to the ranks', on its own."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_data import REPO, free_port, tiny_mae_args

from lvmae.errors import UserError
from lvmae_cli.main import main
from train.runlog import read_log
from train.slurm import first_host, master_port, rank_env, tasks_on_node

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "srun", "scancel")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# One task of a two-task, one-node job step, as srun sets it (Slurm 22.05).
STEP = {
    "SLURM_JOB_ID": "4711",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2",
    "SLURM_STEP_NODELIST": "node-[3-4]",
    "SLURM_JOB_NODELIST": "node-[3-4]",
    "SLURM_CPUS_ON_NODE": "16",
}


def test_slurm_variables_become_the_ranks():
    env = rank_env(STEP, hostnames=lambda nodes: {"node-[3-4]": "node-3"}[nodes])
    assert env == {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "MASTER_ADDR": "node-3",
        "MASTER_PORT": str(master_port(4711, 0)),
        "OMP_NUM_THREADS": "8",  # the node's 16 CPUs for its 2 ranks
    }
    # Rank 9 of 16: the second node's second task; the port is every task's, and the step's own.
    other = {**STEP, "SLURM_PROCID": "9", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "16"}
    other |= {
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
        "SLURM_CPUS_PER_TASK": "6",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }
    env = rank_env(other, hostnames=lambda nodes: "node-3")
    ranks = [env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK")]
    assert ranks == ["9", "16", "8", "1"]
    assert env["OMP_NUM_THREADS"] == "6" and env["MASTER_PORT"] == str(master_port(4711, 0))
    assert master_port(4711, 1) != master_port(4711, 0) and 20000 <= master_port(4711, 0) < 30000
    assert "OMP_NUM_THREADS" not in rank_env({**STEP, "OMP_NUM_THREADS": "3"}, hostnames=str)
    given = rank_env(STEP, master_addr="10.0.0.1", port=1234, hostnames=str)
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.1", "1234")
    assert [tasks_on_node("4(x2),2,1", n) for n in range(4)] == [4, 4, 2, 1]


def test_a_task_bound_to_one_gpu_is_one_clear_error():
    with pytest.raises(
        UserError, match=r"sees 1 GPU\(s\) .* for 2 ranks on its node: allocate with --gpus-per-node"
    ):
        rank_env({**STEP, "CUDA_VISIBLE_DEVICES": "1"}, hostnames=str)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("SLURM_JOB_ID", r"--launcher slurm runs inside a Slurm allocation, and there is none here"),
        ("SLURM_STEP_ID", r"--launcher slurm starts one rank per Slurm task: run it under srun \(srun lvmae"),
    ],
)
def test_launch_outside_an_allocation_or_a_step_is_one_clear_line(monkeypatch, capsys, drop, message):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in STEP.items():
        if key != drop:
            monkeypatch.setenv(key, value)
    code = main(["launch", "--launcher", "slurm", "--", "train", "mae", str(REPO / "configs/demo_cpu.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(r"^lvmae launch: error: " + message, err), err


def test_launcher_options_slurm_decides_are_refused(capsys):
    code = main(["launch", "--launcher", "slurm", "--nproc", "2", "--", "train", "mae", "r.yaml"])
    assert code == 2 and "--nproc: not with --launcher slurm" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="no scontrol (make tools installs slurm-wlm)")
def test_the_first_host_comes_from_scontrol(tmp_path, monkeypatch):
    # scontrol wants a config, even to expand a node list (which needs no controller)
    (tmp_path / "slurm.conf").write_text(slurm_conf(tmp_path, "node"))
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    assert first_host("gpu-[03-05,9],cpu-1") == "gpu-03"


# ---- a real one-node Slurm ----------------------------------------------------------------------------


def slurm_conf(root: Path, node: str) -> str:
    """One node of 2 CPUs on 127.0.0.1, everything under `root`: no systemd, cgroups or accounting."""
    return f"""ClusterName=lvmaetest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it starts again (default 120 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/slurmd
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster -> the environment its clients need (SLURM_CONF)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # daemons: sbin
    tools = {tool: shutil.which(tool, path=search) for tool in (*DAEMONS, *CLIENTS)}
    missing = [tool for tool, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"Slurm tests skipped: {' '.join(missing)} not installed (make tools: slurm-wlm, munge)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "ctld", "slurmd", "log"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o755)  # munged wants its socket's folder reachable by everyone
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(slurm_conf(root, node))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    m = root / "munge"
    munged = [tools["munged"], "-F", "--force", f"--key-file={key}", f"--socket={m}/munge.socket"]
    munged += [f"--pid-file={m}/pid", f"--seed-file={m}/seed", f"--log-file={root}/log/munged.log"]
    commands = [
        munged,
        [tools["slurmctld"], "-D", "-i", "-f", str(root / "slurm.conf")],
        [tools["slurmd"], "-D", "-N", node, "-f", str(root / "slurm.conf")],
    ]
    procs: list[subprocess.Popen] = []
    try:
        for cmd in commands:
            # In the foreground (-D), the Slurm daemons log to stderr: here.
            with open(root / "log" / f"{Path(cmd[0]).name}.out", "w") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            if cmd is commands[0]:  # munged: the others authenticate through its socket
                wait_for(lambda: (m / "munge.socket").exists() or procs[0].poll() is not None, 10)
        state = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and state != "idle" and all(p.poll() is None for p in procs):
            time.sleep(0.3)
            run = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            state = run.stdout.strip()
        if state != "idle":
            names = [Path(cmd[0]).name for cmd in commands]
            dead = [name for name, p in zip(names, procs) if p.poll() is not None]
            logs = "; ".join(f"{name}: {last_line(root / 'log' / f'{name}.out')}" for name in names)
            pytest.skip(f"Slurm tests skipped: the local daemons did not start here (exited: {dead}, {logs})")
        yield env
    finally:
        stop(procs)


def last_line(path: Path) -> str:
    lines = path.read_text().strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "(nothing)"


def wait_for(ready, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.1)


def job_fields(job: str, env: dict[str, str]) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


@pytest.mark.slow
def test_sbatch_runs_two_ranks_and_a_usr1_requeues_the_job_which_goes_on(
    slurm, train_data, uninterrupted, tmp_path
):
    """ops/slurm/pretrain.sbatch as a user submits it (its node and task counts overridden on sbatch's
    command line, no GPUs here), on the tiny data set: two Slurm tasks, two ranks. USR1 to the batch
    script (what `#SBATCH --signal=B:USR1@120` sends before the time limit) reaches the ranks, which stop
    after their step with a checkpoint; the script requeues the job, whose next start resumes: the job
    ends COMPLETED after one restart, with exactly the losses of a run never stopped."""
    out = tmp_path / "run"
    overrides = tiny_mae_args(train_data, out, "run.steps=12", "run.checkpoint_every=4")[3:]
    # `lvmae` on PATH, as the template wants, and nothing else of the venv's bin: its ninja may not be
    # the one the other tests' ranks find (here 1.13 against Debian's 1.11), and a build logged by another
    # ninja counts as stale: DeepSpeed's JIT-built comm op, shared by every test, would be rebuilt.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "lvmae").write_text(f'#!/bin/sh\nexec {sys.executable} -m lvmae_cli "$@"\n')
    (tmp_path / "bin" / "lvmae").chmod(0o755)
    env = {
        **slurm,
        "PATH": os.pathsep.join([str(tmp_path / "bin"), os.environ.get("PATH", "")]),
        "RECIPE": str(REPO / "configs/demo_cpu.yaml"),
    }
    env.pop("OMP_NUM_THREADS", None)  # the launcher sets it from Slurm's CPUs per task
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0"]
    cmd += ["--cpus-per-task=1", "--time=5", f"--output={tmp_path}/job-%j.out", f"--chdir={REPO}"]
    submit = subprocess.run(
        [*cmd, str(REPO / "ops/slurm/pretrain.sbatch"), *overrides], env=env, capture_output=True, text=True
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    job_log = tmp_path / f"job-{job}.out"

    def text() -> str:
        return job_log.read_text() if job_log.exists() else ""

    try:
        deadline = time.monotonic() + 240
        log_file = out / "train_log.jsonl"
        steps = lambda: [r["step"] for r in read_log(log_file)] if log_file.is_file() else []  # noqa: E731
        while time.monotonic() < deadline and not any(s >= 2 for s in steps()):
            assert job_fields(job, slurm).get("JobState") not in DONE, text()[-4000:]
            time.sleep(0.2)
        signal = subprocess.run(
            ["scancel", "--batch", "--signal=USR1", job], env=slurm, capture_output=True, text=True
        )
        assert signal.returncode == 0, signal.stderr
        fields: dict[str, str] = {}
        while time.monotonic() < deadline and fields.get("JobState") not in DONE:
            time.sleep(0.5)
            fields = job_fields(job, slurm)
    finally:
        if job_fields(job, slurm).get("JobState") not in DONE:
            subprocess.run(["scancel", job], env=slurm, check=False)
    log = text()
    assert (fields.get("JobState"), fields.get("ExitCode")) == ("COMPLETED", "0:0"), log[-4000:]
    assert fields["NumTasks"] == "2" and fields["Requeue"] == "1" and fields["Restarts"] == "1", fields
    assert "lvmae launch: rank 0 of 2" in log and "lvmae launch: rank 1 of 2" in log, log[-4000:]
    stopped = re.search(r"preempted on SIGUSR1: stopped after step (\d+)", log)
    assert stopped and "requeueing job" in log, log[-4000:]
    assert f"at step {stopped.group(1)}" in log  # the second start resumed from that checkpoint
    records = read_log(out / "train_log.jsonl")
    assert records[0]["samples"] == 4  # 2 ranks x batch 2
    assert [(r["step"], r["loss"], r["lr"]) for r in records] == [
        (r["step"], r["loss"], r["lr"]) for r in read_log(uninterrupted / "train_log.jsonl")
    ]
    assert (out / "summary.json").is_file() and (out / "export" / "model.safetensors").is_file()
    meta = json.loads((out / "checkpoints" / "step-00000012" / "meta.json").read_text())
    assert meta["world_size"] == 2
