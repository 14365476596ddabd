"""Store outages, for real: a SeaweedFS server killed (SIGKILL) and restarted on the same port and data while
a training run streams from it and while ingest writes to it. Each test has its own server (the session's
shared one is never killed). The runs must finish, and their results must be those of an undisturbed run."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from train_data import finish, launch, losses, mae_args

from ingest.clips import ingest_clips
from ingest.config import ClipSpec, IngestConfig
from ingest.objectstore import LocalS3Server
from ingest.retry import RetryPolicy
from ingest.storage import Store
from ingest.token_store import open_tokens
from ingest.tokens import ingest_tokens

OUTAGE_S = 20.0


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    s3 = LocalS3Server(tmp_path_factory.mktemp("s3-outage"))
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()


def upload_tree(server: LocalS3Server, local: Path, url: str) -> None:
    fs = server.filesystem()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{url.removeprefix('s3://')}/{path.relative_to(local)}")


def tree(local: Path) -> dict[str, bytes]:
    return {str(p.relative_to(local)): p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file()}


def remote_tree(server: LocalS3Server, url: str) -> dict[str, bytes]:
    fs, root = server.filesystem(), url.removeprefix("s3://")
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in sorted(fs.find(root))}


class Outage:
    """Kill the server once `ready()` is true, keep it down `seconds`, start it again (a thread); with
    seconds=None it stays down."""

    def __init__(self, server: LocalS3Server, ready: Callable[[], bool], seconds: float | None):
        self.server, self.ready, self.seconds = server, ready, seconds
        self.killed_at: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + 300
            while not self.ready():
                if time.monotonic() > deadline:
                    raise TimeoutError("the outage's trigger never came")
                time.sleep(0.05)
            self.server.kill()
            self.killed_at = time.monotonic()
            if self.seconds is not None:
                time.sleep(self.seconds)
                self.server.start()
        except BaseException as err:  # reported by check()
            self.error = err

    def check(self) -> None:
        self.thread.join(timeout=400)
        assert self.error is None, f"outage thread: {self.error!r}"
        assert self.killed_at is not None


def aws_env(server: LocalS3Server) -> dict[str, str]:
    """How a user points lvmae at a store: the standard AWS variables (read by botocore, never logged)."""
    return os.environ | {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_ENDPOINT_URL": server.endpoint_url,
    }


@pytest.mark.slow
def test_a_two_rank_run_streams_through_a_20s_outage(server, train_data, uninterrupted, tmp_path):
    """The S3 server dies mid-run for 20 s: the run waits, then finishes with exactly the losses of the
    same run on the local copy of the data (uninterrupted: train_data.py)."""
    local, tid = train_data
    url = server.create_bucket("stream") + "/data"
    upload_tree(server, local, url)
    out = tmp_path / "run"
    log = out / "train_log.jsonl"
    proc = launch(mae_args((url, tid), out), env=aws_env(server))
    outage = Outage(server, lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, OUTAGE_S)
    text = finish(proc, timeout=400)
    outage.check()
    assert "warning: reading" in text and "failed (" in text, text[-3000:]  # the run did wait for the store
    assert losses(out) == losses(uninterrupted)


@pytest.mark.slow
def test_a_run_stops_cleanly_past_the_retry_deadline(server, train_data, tmp_path):
    """A store that stays away longer than data.retry_deadline_s: a checkpoint, one clear line, exit 2."""
    local, tid = train_data
    url = server.create_bucket("gone") + "/data"
    upload_tree(server, local, url)
    out = tmp_path / "run"
    log = out / "train_log.jsonl"
    args = mae_args((url, tid), out, "data.retry_deadline_s=6", "run.checkpoint_every=0")
    proc = launch(args, env=aws_env(server))
    outage = Outage(server, lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, None)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, text[-3000:]
    # one line per rank that got to say it (the launcher ends the others once one has exited): the rank
    # whose read gave up names it, the others say another rank's loader did
    lines = [line for line in text.splitlines() if "lvmae train: error: stopped at step" in line]
    why = ("the store has not answered for", "another rank's loader gave up on the store")
    assert lines and all(any(w in line for w in why) for line in lines), text[-3000:]
    step = int(lines[0].split("stopped at step ")[1].split(":")[0])
    assert all(f"checkpoint {out}/checkpoints/step-{step:08d} saved" in line for line in lines)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    assert "Traceback" not in text
    outage.check()


@pytest.mark.slow
def test_ingest_clips_and_tokens_write_through_outages(server, train_data, sample_videos, capfd):
    """ingest clips, then ingest tokens, to S3 with the server killed for 15 s in the middle of each (longer
    than botocore's and s3fs's own retries last): both finish, and the data set is byte for byte the
    undisturbed local one (train_data.py made it)."""
    local, _ = train_data
    url = server.create_bucket("ingest") + "/data"
    options = server.storage_options()
    watch = Store(url, options, policy=RetryPolicy(deadline_s=0))

    def recorded(prefix: str) -> Callable[[], bool]:
        return lambda: any(n.endswith(".json") for n in watch.list(prefix))

    sources = [str(p) for p in sample_videos.values()]
    cfg = IngestConfig(clip=ClipSpec(num_frames=8, size=32), shard_clips=8, storage_options=options)
    outage = Outage(server, recorded("shards"), seconds=15)
    summary = ingest_clips(sources, url, cfg, progress=False)
    outage.check()
    assert "warning: uploading s3://ingest/data/shards/" in capfd.readouterr().err  # it did wait
    assert summary.index_written and summary.shards_skipped == 0
    wanted = {k: v for k, v in tree(local).items() if not k.startswith("tokens/")}
    assert remote_tree(server, url) == wanted

    tokens = next(p for p in (local / "tokens").iterdir() if p.is_dir())
    outage = Outage(server, recorded(f"tokens/{tokens.name}/_done"), seconds=15)
    done = ingest_tokens(
        url, str(local.parent / "tokenizer"), device="cpu", storage_options=options, progress=False
    )
    outage.check()
    assert "warning: tokenizing s3://ingest/data/shards/" in capfd.readouterr().err
    assert done.complete and done.shards_skipped == 0
    theirs, ours = (
        open_tokens(Store(str(local)), f"tokens/{tokens.name}"),
        open_tokens(watch, done.store[len(url) + 1 :]),
    )
    for name in ("codes", "priority", "keys", "valid"):
        assert np.array_equal(ours[name][:], theirs[name][:]), name
    for rel in ("errors.jsonl", *(f"_done/{p.name}" for p in (tokens / "_done").iterdir())):
        assert watch.read_bytes(f"tokens/{tokens.name}/{rel}") == (tokens / rel).read_bytes(), rel
