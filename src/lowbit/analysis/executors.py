"""Where sweep configurations run: worker processes on this machine, or Ray tasks on a cluster.

An executor takes a picklable function and a list of jobs and yields ``(job, result)`` pairs as
they finish; a job whose worker raised or died yields the exception as its result.  Every job runs
in a fresh process (its peak memory is its own) with a fixed number of torch threads, so a
configuration gives the same numbers whichever executor ran it.  Closing the iterator early (an
interrupt) stops the jobs still running instead of waiting for them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from typing import Any, Protocol

from lowbit.errors import LowbitError

EXIT_GRACE_S = 60.0  # a worker that sent its result gets this long to exit before it is terminated
STOP_WAIT_S = 5.0  # after terminate (SIGTERM), then kill (SIGKILL)


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
    """``workers`` spawned processes on this machine, a fresh one per job.

    Workers ignore SIGINT (a Ctrl-C reaches the whole process group): when the caller stops
    iterating (an interrupt, an error, ``close()``), the workers still running are terminated, not
    waited for."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise LowbitError(f"workers must be at least 1, got {workers}")
        self.workers = workers

    def run(self, fn: Callable[[Any], Any], jobs: list[Any]) -> Iterator[tuple[Any, Any]]:
        ctx = multiprocessing.get_context("spawn")  # no forked torch state; the same start as Ray's workers
        queue = list(jobs)
        running: dict[Connection, tuple[Any, Any]] = {}  # result pipe -> (process, job)
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    job = queue.pop(0)
                    conn, proc = _start(ctx, fn, job)
                    running[conn] = (proc, job)
                for conn in mp_connection.wait(list(running)):
                    proc, job = running[conn]
                    result = _collect(conn, proc)
                    del running[conn]  # only now: an interrupt while collecting still stops the worker
                    yield job, result
        finally:
            for conn, (proc, _) in running.items():
                _stop(proc, grace=0.0)
                conn.close()


def _worker(fn: Callable[[Any], Any], job: Any, conn: Connection) -> None:
    """A worker process's body: ``fn(job)`` (or the exception it raised) sent back over ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt ends
    try:
        outcome = fn(job)
    except BaseException as exc:  # noqa: BLE001 - reported as the job's result
        outcome = exc
    try:
        conn.send(outcome)
    except Exception as exc:  # noqa: BLE001 - a result or exception that does not pickle
        conn.send(RuntimeError(f"{type(exc).__name__} sending the result: {exc}"))
    conn.close()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this (main) thread meanwhile, so a process started now inherits the ignore."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start(ctx: Any, fn: Callable[[Any], Any], job: Any) -> tuple[Connection, Any]:
    """Start a worker for ``job``: (the pipe end its result arrives on, the process)."""
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(fn, job, writer))
    with _sigint_ignored():
        proc.start()
    writer.close()  # the worker holds the only write end: its exit makes the reader ready
    return reader, proc


def _collect(conn: Connection, proc: Any) -> Any:
    """The result (or exception) a finished worker sent; an error when it died without sending one."""
    try:
        return conn.recv()
    except EOFError:
        code = _stop(proc, grace=EXIT_GRACE_S)
        return RuntimeError(f"the worker process died (exit code {code}) before returning a result")
    except Exception as exc:  # noqa: BLE001 - a result that does not unpickle here
        return RuntimeError(f"cannot read the worker's result ({type(exc).__name__}: {exc})")
    finally:
        conn.close()
        _stop(proc, grace=EXIT_GRACE_S)


def _stop(proc: Any, grace: float) -> int | None:
    """Wait up to ``grace`` seconds for ``proc`` to exit, then terminate it (and kill it if it must);
    returns its exit code."""
    proc.join(grace)
    for end in (proc.terminate, proc.kill):
        if proc.exitcode is not None:
            break
        end()
        proc.join(STOP_WAIT_S)
    return proc.exitcode


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
        pending: dict[Any, Any] = {}
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
            for ref in pending:  # abandoned (an interrupt): stop the tasks instead of leaving them running
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
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
