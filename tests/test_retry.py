"""ingest.retry on its own (a fake clock, no sleeping) and inside the loader's shard reader."""

from __future__ import annotations

import io
import random

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError
from test_loader import Flaky, new_stats, tar_bytes

from ingest.retry import RetryPolicy, StoreRetry, StoreUnavailable, is_transient
from train.stream import LoaderError, read_shards


class FakeTime:
    """A clock that only moves when the retry sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def fake_retry(deadline: float = 60.0) -> tuple[StoreRetry, FakeTime, list[str]]:
    t, lines = FakeTime(), []
    retry = StoreRetry(RetryPolicy(deadline_s=deadline), log=lines.append, clock=t.clock, sleep=t.sleep)
    return retry, t, lines


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_what_counts_as_transient():
    assert is_transient(OSError("connection reset"))
    assert is_transient(TimeoutError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(client_error("SlowDown", 503)) and is_transient(client_error("InternalError", 500))
    assert is_transient(
        ValueError("<Token var=<ContextVar name='current_task'>> was created in a different Context")
    )
    for permanent in (
        FileNotFoundError("no such key"),
        PermissionError("denied"),
        client_error("NoSuchKey", 404),
        client_error("AccessDenied", 403),
        ParamValidationError(report="bad bucket"),
        ValueError("bad value"),
        StoreUnavailable("already gave up"),
    ):
        assert not is_transient(permanent), permanent


def test_backoff_doubles_to_its_cap_with_bounded_jitter():
    policy, rng = RetryPolicy(initial_s=0.5, max_s=30, jitter=0.5), random.Random(0)
    for attempt, base in [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (20, 30.0)]:
        pauses = [policy.pause(attempt, rng) for _ in range(200)]
        assert base * 0.5 <= min(pauses) < max(pauses) <= base * 1.5


def test_failures_are_waited_out_counted_and_logged():
    retry, t, lines = fake_retry()
    calls, stalled = [], []
    retry.sleep = lambda s: (stalled.append(retry.stalled_seconds()), t.sleep(s))

    def flaky() -> str:
        calls.append(t.now)
        if len(calls) <= 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        return "answer"

    assert retry.call(flaky, "reading s3://b/x") == "answer"
    assert len(calls) == 4 and retry.retries == 3 and len(lines) == 3
    assert "reading s3://b/x failed (EndpointConnectionError" in lines[0] and "attempt 2" in lines[0]
    assert (
        stalled[0] == 0 and stalled[1] > 0 and stalled == sorted(stalled)
    )  # seconds since the first failure
    assert retry.stalled_seconds() == 0  # it answered: no longer stalled


def test_the_deadline_ends_the_wait_with_a_clear_error():
    retry, t, _ = fake_retry(deadline=120)
    count = [0]
    retry.on_retry.append(lambda: count.__setitem__(0, count[0] + 1))

    def down() -> None:
        raise OSError("connection refused")

    with pytest.raises(StoreUnavailable, match=r"reading s3://b/x: the store has not answered for 120 s"):
        retry.call(down, "reading s3://b/x")
    assert t.now - 1000 == pytest.approx(120) and count[0] == retry.retries >= 5
    assert max(t.pauses) <= 30 * 1.5 and retry.stalled_seconds() == 0


def test_permanent_errors_are_not_retried():
    retry, _, lines = fake_retry()
    with pytest.raises(FileNotFoundError):
        retry.call(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "reading x")
    assert retry.retries == 0 and not lines


def test_a_shard_read_through_an_outage_gives_every_sample_once():
    samples = [(f"k{i}", {"webm": bytes([i]) * 2000, "json": b"{}"}) for i in range(6)]
    data = tar_bytes(samples)
    opened: list[int] = []

    def open_shard(name: str) -> io.BytesIO:
        opened.append(len(opened))
        if 2 <= len(opened) <= 4:  # the store is down for three opens after the first read broke
            raise OSError("connection refused")
        return Flaky(data, 7000 if len(opened) == 1 else None)

    retry, t, lines = fake_retry(deadline=60)
    stats = new_stats()
    got = list(read_shards(["s"], open_shard, retries=0, stats=stats, retry=retry))
    assert got == samples and stats["bad_shards"] == 0
    assert retry.retries == 4 and stats["retries"] == 4 and len(lines) == 4 and t.now > 1000

    retry, t, _ = fake_retry(deadline=60)
    with pytest.raises(StoreUnavailable, match="reading shard s: the store has not answered for 60 s"):
        list(read_shards(["s"], lambda name: Flaky(data, 100), retries=0, stats=new_stats(), retry=retry))


def test_a_missing_shard_fails_at_once_with_its_name():
    retry, _, _ = fake_retry()

    def missing(name: str) -> io.BytesIO:
        raise FileNotFoundError(f"no {name}")

    with pytest.raises(LoaderError, match="cannot read shard s7: no s7"):
        list(read_shards(["s7"], missing, retries=3, stats=new_stats(), retry=retry))
    assert retry.retries == 0


def test_the_training_metrics_show_a_stall_while_it_lasts():
    from train.metrics import TrainMetrics

    retry, t, _ = fake_retry(deadline=600)
    metrics = TrainMetrics(rank=0)
    metrics.watch_store(retry)

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name) or 0.0

    seen: list[tuple[float, float]] = []
    retry.sleep = lambda s: (
        seen.append((value("lvmae_loader_store_stalled_seconds"), value("lvmae_loader_retries_total"))),
        t.sleep(s),
    )
    answers = iter([OSError("refused")] * 4 + ["ok"])

    def read() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retry.call(read, "reading x") == "ok"
    assert [r for _, r in seen] == [1, 2, 3, 4]  # counted at once, while the loop would be blocked
    assert seen[0][0] == 0 < seen[1][0] < seen[2][0] < seen[3][0]  # seconds since the first failure
    assert value("lvmae_loader_store_stalled_seconds") == 0 and value("lvmae_loader_retries_total") == 4


def test_abandoned_transient_errors_of_concurrent_reads_are_not_reported(caplog):
    """zarr reads chunks as concurrent tasks: when the store is down, the errors nobody awaited are
    dropped from asyncio's log (the one awaited is retried); any other abandoned error is still shown."""
    import asyncio
    import gc

    StoreRetry()  # installs the filter

    async def fail(err: Exception) -> None:
        raise err

    async def abandon() -> None:
        tasks = [asyncio.ensure_future(fail(e)) for e in (OSError("connection refused"), KeyError("a bug"))]
        await asyncio.sleep(0.01)
        tasks.clear()  # nobody retrieves their exceptions

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(abandon())
        gc.collect()
    reported = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [type(e) for e in reported] == [KeyError]
