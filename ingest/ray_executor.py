"""`--executor ray`: `lvmae ingest clips` and `lvmae ingest tokens` on a Ray cluster.

Ray is optional (`pip install lvmae[ray]`): it is imported here only, and only when this executor runs.
The driver (the `lvmae` process) plans, skips what is already recorded and finalizes exactly as the local
executor does; only the per-shard work moves to the cluster:

- clips: one Ray task per clip shard, `ingest.shards.write_shard(ShardTask)`, 1 CPU each. A task whose
  worker process (or node) dies is run again, up to MAX_RETRIES times: a shard is committed by its
  record, written after its tar, so a rerun rewrites the same bytes. An exception raised by the task
  itself is not retried; it reaches the driver as it would from the process pool.
- tokens: one actor per GPU when the cluster has GPUs (and --device is not cpu), else CPU actors, each
  holding the tokenizer (shipped once through the object store) and running one clip shard at a time.
  A CPU actor takes as many CPUs as the driver's torch would use threads (capped by the largest node),
  and uses that many threads: torch's CPU kernels sum in an order that depends on the thread count, so
  this is what keeps the priorities bit-identical to a local run. An actor that dies is restarted and
  its shard run again (each clip shard owns its Zarr objects, so shards are written concurrently).

Storage options travel inside the task arguments as they do to the process pool (credentials are not
among them: workers read them from their own environment, like every other node of a SLURM array);
Ray does not log task arguments.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

MAX_RETRIES = 3  # runs of a shard beyond the first when its worker process, actor or node dies
INSTALL = "pip install lvmae[ray]"
_CONNECT_WAIT_S = 10.0  # how long a HOST:PORT address may refuse connections before we give up


class ExecutorError(Exception):
    """The Ray executor cannot run or finish (Ray missing, no cluster at the address, a shard whose
    workers kept dying): a user error, with what to do."""


def check_available() -> None:
    """Raise ExecutorError unless Ray can be imported (without importing it)."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except ValueError:  # sys.modules["ray"] is None or has no spec
        found = False
    if not found:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed here: {INSTALL}")


def _host_port(address: str) -> tuple[str, int] | None:
    """("127.0.0.1", 6379) from "127.0.0.1:6379" (or "[::1]:6379"); None for "auto", "ray://...", ..."""
    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _routable_ip() -> str | None:
    """The address Ray would give this machine (the one a route to the internet leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))  # UDP: nothing is sent
            return s.getsockname()[0]
        except OSError:
            return None


def _keep_loopback(address: str | None) -> bool:
    """Whether Ray must be kept from swapping 127.0.0.1 for this machine's routable address: for a local
    instance, and for a cluster at a loopback address whose head listens on loopback only (a head started
    the usual way listens on every interface, and Ray's swap is what reaches it)."""
    if address is None:
        return True
    target = _host_port(address)
    if target is None:
        return False
    host, port = target
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
    routable = _routable_ip()
    return loopback and (routable is None or not _answers(routable, port))


def _import_ray(keep_loopback: bool) -> Any:
    """The ray module; keep_loopback: with 127.0.0.1 left as it is (see _keep_loopback).

    Ray replaces 127.0.0.1, as a node or a cluster address, by the machine's routable address unless its
    multi-node switch is off; the switch is an environment variable, read when ray is imported and
    inherited by the processes a local instance starts.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if keep_loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as err:
        raise ExecutorError(f"--executor ray: Ray does not import ({err}): {INSTALL}") from None
    constants = sys.modules.get("ray._private.ray_constants")
    if keep_loopback and constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set
    return ray


def _wait_for(address: str) -> None:
    """Raise ExecutorError unless HOST:PORT accepts connections within _CONNECT_WAIT_S (ray.init would
    keep retrying for minutes). Addresses without a port ("auto", "ray://...") are left to ray.init."""
    target = _host_port(address)
    deadline = time.monotonic() + _CONNECT_WAIT_S
    while target is not None and not _answers(*target, timeout=2):
        if time.monotonic() > deadline:
            raise ExecutorError(
                f"no Ray cluster answers at {address}; start one with `ray start --head`, or leave out "
                "--ray-address to start a local Ray"
            )
        time.sleep(0.5)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected, for the length of the block -> the ray module.

    address None: a fresh local instance on 127.0.0.1 with `num_cpus` CPUs (None: all) and the GPUs it
    finds, no dashboard, no usage stats; stopped on exit. Else the cluster at `address` ("auto",
    "HOST:PORT"), left running on exit. A session the caller opened already is used as it is.
    """
    check_available()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        yield ray
        return
    if address is not None:
        _wait_for(address)
    ray = _import_ray(_keep_loopback(address))
    quiet = {"logging_level": logging.WARNING}
    try:
        if address is None:
            local = {"num_cpus": num_cpus, "include_dashboard": False, "_node_ip_address": "127.0.0.1"}
            ray.init(address="local", **local, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise ExecutorError(f"cannot start or join Ray (--ray-address {address or 'unset'}): {err}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _result(ray: Any, ref: Any, what: str) -> Any:
    """ray.get(ref), with the task's own exception raised as itself (as the process pool does)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from err
        raise
    except ray.exceptions.RayError as err:  # worker, actor or node lost more often than retried
        raise ExecutorError(
            f"{what}: {type(err).__name__} after {MAX_RETRIES} retries ({str(err).splitlines()[0]}); "
            "run the same command again: it resumes"
        ) from None


def _cancel(ray: Any, refs: Iterable[Any]) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref)


def write_shards(
    ray: Any, tasks: list[Any], run_shard: Callable[[Any], dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """run_shard(task) for each task (a ShardTask, for ingest.shards.write_shard), one Ray task each ->
    the shard records, in the order they complete. run_shard must pickle: a module-level function; Ray
    names its worker processes after it. At most twice the cluster's CPUs are submitted at a time (a task
    carries its shard's clip list)."""
    remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(run_shard)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue = iter(tasks)
    pending: dict[Any, str] = {}
    try:
        while True:
            for task in itertools.islice(queue, window - len(pending)):
                pending[remote.remote(task)] = f"clip shard {task.index}"
            if not pending:
                return
            [ready], _ = ray.wait(list(pending), num_returns=1)
            yield _result(ray, ready, pending.pop(ready))
    finally:
        _cancel(ray, pending)


class _ShardActor:
    """One Ray actor: a runner built once (the tokenizer loaded, the store open), then shard after shard."""

    def __init__(self, make_runner: Callable[[str], Any], device: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.runner = make_runner(device)

    def shard(self, k: int, name: str) -> dict[str, Any]:
        return self.runner.shard(k, name)


def _actor_layout(ray: Any, device: str, threads: int) -> tuple[str, int, dict[str, Any]]:
    """-> (device of the actors, their threads, Ray options), from --device and the cluster's resources."""
    kind = device.split(":")[0]
    if kind not in ("auto", "cpu", "cuda"):
        raise ExecutorError(f"unknown device {device!r}: use auto, cpu or cuda")
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if kind == "cuda" and gpus == 0:
        raise ExecutorError(f"device {device!r} asked for, but the Ray cluster has no GPUs: use --device cpu")
    if kind != "cpu" and gpus > 0:
        return "cuda", 1, {"num_gpus": 1, "num_cpus": 1}
    largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1)
    threads = max(1, min(threads, largest))
    return "cpu", threads, {"num_cpus": threads}


def _actor_count(ray: Any, options: dict[str, Any], shards: int) -> int:
    """How many actors of `options` fit on the cluster's live nodes at once (at least 1), up to `shards`."""
    resource, size = ("GPU", 1) if "num_gpus" in options else ("CPU", options["num_cpus"])
    fit = sum(int(n["Resources"].get(resource, 0)) // size for n in ray.nodes() if n["Alive"])
    return max(1, min(fit, shards))


def tokenize_shards(
    ray: Any,
    make_runner: Callable[[str], Any],
    todo: list[tuple[int, str]],
    device: str,
    threads: int,
) -> tuple[str, Iterator[dict[str, Any]]]:
    """Run clip shards (number, name) on Ray actors; make_runner(device) builds an object whose
    .shard(k, name) tokenizes one and returns its record. threads: the torch threads a local run uses.

    -> (what ran it, for the summary; the records in the order they complete).
    """
    device, threads, options = _actor_layout(ray, device, threads)
    count = _actor_count(ray, options, len(todo))
    actor_class = ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES, **options)(_ShardActor)
    runner = ray.put(make_runner)  # the tokenizer crosses the network once, not once per actor
    actors = [actor_class.remote(runner, device, threads) for _ in range(count)]
    per_actor = "one per GPU" if device == "cuda" else f"{threads} threads each"
    return f"{device}, {count} Ray actors ({per_actor})", _on_actors(ray, actors, todo)


def _on_actors(ray: Any, actors: list[Any], todo: list[tuple[int, str]]) -> Iterator[dict[str, Any]]:
    """Hand each idle actor the next shard until all are done; the actors are ended at the end."""
    idle, queue = list(actors), iter(todo)
    pending: dict[Any, tuple[Any, str]] = {}
    try:
        while True:
            for actor, (k, name) in zip(list(idle), queue):
                idle.remove(actor)
                pending[actor.shard.remote(k, name)] = (actor, name)
            if not pending:
                return
            [ready], _ = ray.wait(list(pending), num_returns=1)
            actor, name = pending.pop(ready)
            idle.append(actor)
            yield _result(ray, ready, f"tokenizing {name}")
    finally:
        _cancel(ray, pending)
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
