"""Where independent jobs run: local worker processes (default) or a Ray cluster.

A job here is a module-level function called with picklable arguments that writes its own
result atomically to a path the caller chose (a retrain's set_XXX.json, a query chunk's npz)
and returns that path. Jobs are therefore idempotent: a job whose worker was lost is simply
run again (Ray retries it by itself; locally the caller's resume finds the missing file), and a
result is never half written nor counted twice.

    ex = make_executor("local", jobs=2)            # or make_executor("ray", address="auto")
    for path in ex.run(fn, [args1, args2, ...]):   # yields as jobs finish, in any order
        ...

Ray is an optional extra (requirements-ray.txt); it is imported only when asked for.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import types
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Callable, Iterator, Optional, Sequence

from engine.errors import UserError

EXECUTORS = ("local", "ray")


_MAIN_LOCK = threading.RLock()


@contextlib.contextmanager
def neutral_main():
    """Start processes as if from a bare interpreter. A spawned child re-imports the parent's
    __main__; under `streamlit run` (and AppTest, which leaves it set) that is the app script,
    which would run the whole page again in every worker. A __main__ without a file or spec
    makes the child import nothing: job functions are found by their own module names."""
    with _MAIN_LOCK:  # two threads swapping at once could leave the stand-in in place
        saved = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = saved


def exit_with_parent() -> None:
    """In a worker: exit once the process that started it is gone. A parent killed outright
    (SIGKILL, out of memory, or SIGTERM to a process that runs jobs of its own, as the app's
    workers do) runs no exit hook, and its pool's workers, running a job or blocked on their
    call queue, would otherwise live on as orphans holding a gigabyte each. (prctl's
    PR_SET_PDEATHSIG does not fit: it fires when the *thread* that started the process ends,
    and a pool's workers are started by short-lived job threads. A worker paused by SIGSTOP when
    its parent dies cannot watch; the pause lasts one interactive job.)"""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:  # re-parented: the parent is dead
                os._exit(0)
    threading.Thread(target=watch, daemon=True, name="exit with parent").start()


def set_threads(threads: int) -> None:
    """A worker's torch thread count (a pool initializer)."""
    import torch
    torch.set_num_threads(threads)


def _worker_init(threads: int) -> None:
    """A local worker's start: it dies with its parent, and uses `threads` torch threads."""
    exit_with_parent()
    set_threads(threads)


def _call_with_threads(fn: Callable, threads: int, args: tuple):
    set_threads(threads)
    return fn(*args)


class LocalExecutor:
    """`jobs` spawned worker processes that split this machine's cores between them.

    The workers outlive one `run`: a finished run leaves its pool idle for the next run in this
    process that asks for the same workers (same count, threads, environment, sys.path and
    working directory), because starting a worker costs more than many jobs (about 3 s to
    spawn and import torch and the engine, against 0.9 s for a BPD on `tiny`); a `precompute`
    or an `lds` runs several phases. A pool is taken out of the idle set while it runs, so two
    threads never share one, and an interrupted run terminates its own workers only."""

    def __init__(self, jobs: int = 1):
        self.jobs = max(1, int(jobs))

    def run(self, fn: Callable, arglist: Sequence[tuple]) -> Iterator:
        if not arglist:
            return
        jobs = min(self.jobs, len(arglist))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        key = _pool_key(jobs, threads)
        pool, reused = _checkout(key, jobs, threads)
        futures, yielded = [], 0
        try:
            while True:
                try:
                    with neutral_main():  # the processes start on submit
                        futures = [pool.submit(fn, *args) for args in arglist]
                    for f in as_completed(futures):
                        result = f.result()
                        yielded += 1
                        yield result
                    break
                except BrokenProcessPool:
                    if not reused or yielded:
                        raise
                    # A worker of an idle pool died since its last run (killed, out of memory):
                    # every job again on a fresh pool (jobs are idempotent), once.
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool, reused = _new_pool(jobs, threads), False
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM through the CLI, a failed job, the caller stopped
            # iterating): stop the workers now rather than let them finish their jobs
            # unobserved, which a plain `with` (shutdown(wait=True)) would wait for. A job cut
            # short has written no result (results are atomic), so a rerun redoes exactly it
            # (a replay from the last state it kept, engine.metagrad's resume).
            _stop(pool, futures)
            raise
        _checkin(key, pool)


class InlineExecutor:
    """Jobs one after another in this process and thread, for a caller that is itself a worker
    whose torch thread count is set from outside: the app's lanes (webapp.jobs) share the cores
    between their jobs and change a job's threads at its progress reports, which a pool of its
    own would not see (its processes start with every core's threads)."""

    jobs = 1

    def run(self, fn: Callable, arglist: Sequence[tuple]) -> Iterator:
        for args in arglist:
            yield fn(*args)


# Idle pools by key; at most one per key and IDLE_POOLS in all (the oldest is shut down), so
# a long-lived process (the app) keeps a bounded number of idle workers.
IDLE_POOLS = 2
_IDLE: dict[tuple, ProcessPoolExecutor] = {}
_IDLE_LOCK = threading.Lock()


def _pool_key(jobs: int, threads: int) -> tuple:
    """What a spawned worker inherits at its start: a worker made under another environment
    (a changed variable, sys.path or directory) is not reused."""
    return (jobs, threads, os.getcwd(), tuple(sys.path), tuple(sorted(os.environ.items())))


def _new_pool(jobs: int, threads: int) -> ProcessPoolExecutor:
    # spawn, not fork: the parent may hold torch's thread pools or a server's threads
    return ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(threads,))


def _checkout(key: tuple, jobs: int, threads: int) -> tuple[ProcessPoolExecutor, bool]:
    """An idle pool for `key` (and True), or a new one (and False)."""
    with _IDLE_LOCK:
        pool = _IDLE.pop(key, None)
    if pool is not None and getattr(pool, "_broken", False):
        pool.shutdown(wait=False, cancel_futures=True)
        pool = None
    return (pool, True) if pool is not None else (_new_pool(jobs, threads), False)


def _checkin(key: tuple, pool: ProcessPoolExecutor) -> None:
    if getattr(pool, "_broken", False):
        pool.shutdown(wait=False)
        return
    with _IDLE_LOCK:
        old = [_IDLE.pop(key)] if key in _IDLE else []
        _IDLE[key] = pool
        while len(_IDLE) > IDLE_POOLS:
            old.append(_IDLE.pop(next(iter(_IDLE))))
    for p in old:
        p.shutdown(wait=False)


def _stop(pool: ProcessPoolExecutor, futures: list) -> None:
    """Cancel what has not started and terminate the workers of `pool` (running jobs included)."""
    for f in futures:
        f.cancel()
    # No public API stops a running job; the pool's process table is the only handle on them.
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(10)


class RayExecutor:
    """Tasks on a Ray cluster (`address=None` starts a local one). Each task asks for
    `cpus_per_job` CPUs and uses that many torch threads; a task whose worker dies is retried by
    Ray (`max_retries`), which is safe because every job writes its result atomically."""

    def __init__(self, address: Optional[str] = None, cpus_per_job: int = 1, max_retries: int = 3,
                 runtime_env: Optional[dict] = None):
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install -r requirements-ray.txt") from None
        self.ray = ray
        if not ray.is_initialized():
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = runtime_env if runtime_env is not None else {"env_vars": {"PYTHONPATH": root}}
            try:
                ray.init(address=address, runtime_env=env, log_to_driver=False,
                         **({} if address else {"num_cpus": os.cpu_count() or 1}))
            except ConnectionError as e:
                raise UserError(f"cannot reach the Ray cluster at {address}: {e}") from None
        self.cpus_per_job = cpus_per_job
        self.max_retries = max_retries

    def run(self, fn: Callable, arglist: Sequence[tuple]) -> Iterator:
        if not arglist:
            return
        remote = self.ray.remote(num_cpus=self.cpus_per_job, max_retries=self.max_retries)(_call_with_threads)
        pending = [remote.remote(fn, self.cpus_per_job, tuple(args)) for args in arglist]
        try:
            while pending:
                ready, pending = self.ray.wait(pending, num_returns=1)
                yield self.ray.get(ready[0])
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM through the CLI, a failed task, the caller stopped
            # iterating): cancel what is queued or running instead of leaving it to the cluster.
            # A task cut short has written nothing (results are atomic), so a rerun redoes it.
            for ref in pending:
                self.ray.cancel(ref, force=True)
            raise


def make_executor(kind: str = "local", *, jobs: int = 1, address: Optional[str] = None):
    """The executor named `kind` ("local" or "ray"); a bad name is a one-line UserError."""
    if kind == "local":
        return LocalExecutor(jobs)
    if kind == "ray":
        return RayExecutor(address)
    raise UserError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
