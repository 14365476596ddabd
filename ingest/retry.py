"""Waiting out a store that blinks: retry with exponential backoff and jitter, up to a deadline per operation.

botocore and s3fs already retry a failed request a few times (together about 3-12 s against a server that
refuses connections, measured on a local SeaweedFS). That rides out a dropped packet, not a restart of
the storage service or a network blip of a minute. StoreRetry adds the outer layer: it calls an operation
again, after 0.5, 1, 2, ... 30 s (each +-50% jitter), until it succeeds or the operation has kept failing
for `deadline_s` (default 5 minutes). It says so on stderr once per attempt, counts the attempts and knows
for how long it has been stalled (the loader's Prometheus metrics read both while it waits).

Only transient failures are retried: connection errors and timeouts (OSError, botocore's connection and
HTTP errors, aiohttp's client errors), S3 5xx and throttling answers. A missing object, a denied request
or a bad argument fails at once: waiting would not help. The jitter comes from a generator of its own, so
a training run's random state is the same with or without an outage.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# S3 error codes that a healthy request may get from an overloaded or restarting service
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "500",
    "502",
    "503",
    "504",
}
_PERMANENT_OSERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


class _AbandonedTransientErrors(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" reports of transient store errors. zarr reads
    a batch's chunks as concurrent tasks; when the store goes away, the first failure is raised (and
    retried here) and the others' identical errors are left unread, which asyncio reports with a
    traceback when the task is collected: noise in the middle of an outage that is being waited out."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        abandoned = "exception was never retrieved" in str(record.msg)
        return not (abandoned and isinstance(err, Exception) and is_transient(err))


_ASYNCIO_FILTER = _AbandonedTransientErrors()


class StoreUnavailable(Exception):
    """The store kept failing past the retry deadline."""


@dataclass(frozen=True)
class RetryPolicy:
    """deadline_s: how long one operation may keep failing before StoreUnavailable (0: no retries).
    initial_s, max_s: the first and the largest pause between attempts (doubling, +-jitter share)."""

    deadline_s: float = 300.0
    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.5

    def pause(self, attempt: int, rng: random.Random) -> float:
        """The pause before attempt number `attempt` + 1 (attempt >= 1)."""
        base = min(self.initial_s * 2 ** (attempt - 1), self.max_s)
        return base * (1 + self.jitter * (2 * rng.random() - 1))


def store_errors() -> tuple[type[BaseException], ...]:
    """The exception classes a store read raises: OSError, and botocore's where it is installed (it comes
    with s3fs; a machine reading only local files may lack it)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def is_transient(err: BaseException) -> bool:
    """True for failures that waiting may cure: lost connections, timeouts, 5xx and throttling answers."""
    if isinstance(err, (StoreUnavailable, *_PERMANENT_OSERRORS)):
        return False
    if isinstance(err, (OSError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return False
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return str(error.get("Code", "")) in _TRANSIENT_CODES or status.startswith("5")
    if isinstance(err, BotoCoreError):  # connections, timeouts, cut-off responses; not bad parameters
        from botocore import exceptions as e

        kinds = [e.ConnectionError, e.HTTPClientError]
        kinds += [
            getattr(e, name) for name in ("IncompleteReadError", "ResponseStreamingError") if hasattr(e, name)
        ]
        return isinstance(err, tuple(kinds))
    # zarr over an async fsspec store, when the event loop's request is torn down by a refused connection
    return isinstance(err, ValueError) and "ContextVar" in str(err)


class StoreRetry:
    """Retries of one process's store operations (thread-safe): call(fn, what) returns fn()'s result;
    operation(what) serves code that cannot be one call (a stream read in pieces, re-opened on failure).

    retries: attempts made after a failure, in total. stalled_seconds(): for how long the oldest operation
    now failing has been failing (0 when none is). on_retry callbacks run after each failed attempt."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ):
        self.policy = policy or RetryPolicy()
        self.retries = 0
        self.on_retry: list[Callable[[], None]] = []
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._cancelled = threading.Event()
        self.clock, self.sleep = clock, sleep or self._cancelled.wait  # a pause that cancel() cuts short
        self._rng = random.Random()  # its own: the training run's random state must not depend on outages
        self._lock = threading.Lock()
        self._failing: dict[int, float] = {}  # operation id -> when it first failed
        logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)  # once: the same filter object

    def cancel(self) -> None:
        """Stop waiting: every operation now failing, or failing from now on, raises StoreUnavailable at
        once (a run that is stopping must not leave reads in flight behind it)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def stalled_seconds(self) -> float:
        with self._lock:
            return self.clock() - min(self._failing.values()) if self._failing else 0.0

    def operation(self, what: str) -> Operation:
        return Operation(self, what)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """fn() until it succeeds; transient failures are retried until `deadline_s` after the first one,
        then StoreUnavailable (naming `what`, the time waited and the last error). Others are raised."""
        with self.operation(what) as op:
            while True:
                try:
                    return fn()
                except Exception as err:
                    op.failed(err)

    def _mark(self, op: Operation, since: float | None) -> None:
        with self._lock:
            if since is None:
                self._failing.pop(id(op), None)
            else:
                self._failing[id(op)] = since


class Operation:
    """One store operation's failures: failed(err) re-raises a permanent error or one past the deadline,
    else counts, warns and sleeps; progress() restarts the deadline (a long read that got further)."""

    def __init__(self, retry: StoreRetry, what: str):
        self.retry, self.what = retry, what
        self.first: float | None = None
        self.attempt = 0

    def __enter__(self) -> Operation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.retry._mark(self, None)

    def progress(self) -> None:
        if self.first is not None:
            self.first, self.attempt = None, 0
            self.retry._mark(self, None)

    def failed(self, err: Exception) -> None:
        if not is_transient(err):
            raise err
        r, policy = self.retry, self.retry.policy
        if r.cancelled:
            raise StoreUnavailable(f"{self.what}: given up (the run is stopping): {_short(err)}") from err
        now = r.clock()
        if self.first is None:
            self.first = now
            r._mark(self, now)
        waited = now - self.first
        if waited >= policy.deadline_s:
            raise StoreUnavailable(
                f"{self.what}: the store has not answered for {waited:.0f} s "
                f"(retry deadline {policy.deadline_s:.0f} s): {_short(err)}"
            ) from err
        self.attempt += 1
        pause = max(min(policy.pause(self.attempt, r._rng), policy.deadline_s - waited), 0.0)
        with r._lock:
            r.retries += 1
        for callback in r.on_retry:
            callback()
        r.log(
            f"warning: {self.what} failed ({_short(err)}); attempt {self.attempt + 1} in {pause:.1f} s, "
            f"failing for {waited:.0f} s of at most {policy.deadline_s:.0f} s"
        )
        r.sleep(pause)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"
