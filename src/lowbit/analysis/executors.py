"""Where sweep configurations run: worker processes on this machine, or Ray tasks on a cluster.

An executor takes a picklable function and a list of jobs and yields ``(job, result)`` pairs as
they finish; a job whose worker raised or died yields the exception as its result.  Every job runs in a fresh process (its peak memory is its own) with a fixed number of
torch threads, so a configuration gives the same numbers whichever executor ran it.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Protocol

from lowbit.errors import LowbitError


class Executor(Protocol):
    name: str

    def run(self, fn: Callable[[Any], Any], jobs: list[Any]) -> Iterator[tuple[Any, Any]]:
        """``(job, fn(job))`` for every job, in the order they finish (the exception if it failed)."""


class InlineExecutor:
    """Runs jobs one after another in this process (tests, debugging)."""

    name = "inline"

    def run(self, fn: Callable[[Any], Any], jobs: list[Any]) -> Iterator[tuple[Any, Any]]:
        for job in jobs:
            try:
                result = fn(job)
            except Exception as exc:  # noqa: BLE001 - reported as the job's result, like a worker's failure
                result = exc
            yield job, result


class LocalExecutor:
    """``workers`` spawned processes on this machine, a fresh one per job."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise LowbitError(f"workers must be at least 1, got {workers}")
        self.workers = workers

    def run(self, fn: Callable[[Any], Any], jobs: list[Any]) -> Iterator[tuple[Any, Any]]:
        if not jobs:
            return
        ctx = multiprocessing.get_context("spawn")  # no forked torch state; the same start as Ray's workers
        fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # 3.10: workers are reused
        pool = ProcessPoolExecutor(self.workers, mp_context=ctx, **fresh)
        try:
            pending = {pool.submit(fn, job): job for job in jobs}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    exc = fut.exception()
                    yield pending.pop(fut), exc if exc is not None else fut.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # an abandoned sweep does not wait for the queue


class RayExecutor:
    """Ray tasks: joins the cluster at ``address`` (``"auto"`` or ``ray://host:port``), or starts a
    local Ray instance with ``local_cpus`` CPUs when ``address`` is None.  Each task asks for ``cpus``
    CPUs and runs in a fresh worker process."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus: int = 1, local_cpus: int | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise LowbitError("the Ray executor needs Ray: pip install 'lowbit[ray]' (or use --executor local)") from None
        self.address, self.cpus, self.local_cpus = address, cpus, local_cpus or cpus

    def run(self, fn: Callable[[Any], Any], jobs: list[Any]) -> Iterator[tuple[Any, Any]]:
        import ray

        if not jobs:
            return
        started = not ray.is_initialized()
        if started:
            kw: dict[str, Any] = {"address": self.address} if self.address else {"num_cpus": self.local_cpus}
            ray.init(log_to_driver=False, include_dashboard=False, **kw)
        try:
            task = ray.remote(num_cpus=self.cpus, max_calls=1)(fn)
            pending = {task.remote(job): job for job in jobs}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a task error or a lost worker
                        result = exc
                    yield pending.pop(ref), result
        finally:
            if started:
                ray.shutdown()


def make_executor(kind: str, workers: int = 1, ray_address: str | None = None, threads: int = 1) -> Executor:
    """The executor named ``kind`` (``local``, ``ray`` or ``inline``)."""
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(ray_address, cpus=threads, local_cpus=workers * threads)
    if kind == "inline":
        return InlineExecutor()
    raise LowbitError(f"unknown executor {kind!r}: use local, ray or inline")
