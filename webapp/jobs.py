"""Background jobs with progress, one per key, shared by every session of the server process.

A job runs either in a thread of this process or, with `workers > 0`, in a pool of spawned
worker processes. The app uses processes, so that torch work is isolated from the server and
runs in lanes with their own thread counts. (Torch on every core is only fast if the server
itself stays idle: with Streamlit's file watchers on, a new image's BPD took 9x the engine's
time; .streamlit/config.toml turns them off.) A thread in this process still owns each job (it
polls the worker's progress, passes cancellation, and stores the result in the memo), so the
job table and its semantics are the same in both modes. A process job's function must be
picklable: a module-level function, or a functools.partial of one with picklable arguments.
"""

from __future__ import annotations

import concurrent.futures as cf
import concurrent.futures.process  # noqa: F401  (its exit hook must be registered before ours, see _start_pool)
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from multiprocessing.managers import SyncManager
from typing import Callable, Optional

from cache.memo import Memo
from engine.errors import UserError
from engine.executor import neutral_main as _neutral_main
from engine.executor import exit_with_parent, set_threads as _set_threads


_CAN_PAUSE = hasattr(signal, "SIGSTOP")  # POSIX: the other lanes pause while an interactive job computes


def _lane_init(threads: int, nice: int) -> None:
    """A worker process's start: its torch threads, and for the background lane a lower CPU
    priority, so that a drawing's job (interactive) or a visitor's replay is not slowed down by
    the galleries that share the cores (measured on 2 cores: a stroke's influences took 4x the engine's
    own time while the galleries ran at equal priority). While an interactive job computes, the
    other lanes are moreover paused outright (Jobs._pause_background)."""
    exit_with_parent()
    _set_threads(threads)
    if nice:
        os.nice(nice)


def _descendants(pids: list) -> list[int]:
    """The processes below `pids` (children, grandchildren, ...), parents before children, read
    from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # the name in () may hold spaces
        children.setdefault(ppid, []).append(int(e))
    out, frontier = [], [p for p in pids if p is not None]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        out.extend(frontier)
    return out


class Cancelled(Exception):
    """Raised inside a job's callback once the job is cancelled: the engine unwinds cleanly."""


@dataclass
class Job:
    key: str
    label: str
    stage: str = "queued"
    i: int = 0
    n: Optional[int] = None
    done: bool = False
    error: Optional[str] = None
    result: Optional[dict] = None
    started: float = field(default_factory=time.time)
    cancelled: bool = False
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this attempt across processes
    # who waits for it: the sessions that asked (see Jobs.release), and whether anyone asked
    # without saying who (the app's own background work, a test): such a job is never released
    owners: set = field(default_factory=set)
    pinned: bool = False
    lane: str = ""  # where it computes (Jobs.submit); "" for one found finished in the memo
    # an exact replay's latest partial sum {"grad_w", "i", "n"} (webapp.service._attribution)
    partial: Optional[dict] = None

    @property
    def fraction(self) -> Optional[float]:
        return None if not self.n else min(1.0, self.i / self.n)

    def update(self, info: dict) -> None:
        """The engine's callback={...} convention: {"stage"?, "i", "n"}."""
        if self.cancelled:
            raise Cancelled(self.key)
        self.stage = info.get("stage", self.stage)
        self.i, self.n = info.get("i", self.i), info.get("n", self.n)
        self.partial = info.get("partial", self.partial)


def _in_worker(blob: bytes, key: str, shared, lane: str = "interactive") -> bytes:
    """A process job: fn = pickle.loads(blob); its progress goes to shared[key];
    shared[("cancel", key)] stops it (key is the job's token, unique to this attempt);
    shared[("threads", lane)], where the scheduler set it, is the torch thread count the job
    takes up at its start and at each progress report (Jobs._share_cores). The
    function and its result cross the process boundary as plain pickles, never through
    multiprocessing's own pickler: with torch imported, that one sends a tensor as a file
    descriptor fetched from the sending process's resource sharer, a single thread that serves
    one connection at a time; a paused worker (SIGSTOP) caught in that handshake held it, and the
    next drawing's job waited on it forever (measured in the browser benchmark)."""
    fn = pickle.loads(blob)
    threads = [None]

    def take_threads() -> None:
        if lane not in Jobs.SHARED:  # (the interactive lane keeps every core: no round trip to the manager)
            return
        n = shared.get(("threads", lane))
        if n and n != threads[0]:  # between two torch calls: the next parallel region uses n
            _set_threads(n)
            threads[0] = n

    def callback(info: dict) -> None:
        if shared.pop(("cancel", key), None):
            raise Cancelled(key)
        shared[key] = dict(info)
        take_threads()
    take_threads()
    return pickle.dumps(fn(callback), protocol=pickle.HIGHEST_PROTOCOL)


class Jobs:
    """Starts `fn(callback) -> dict` in the background unless its key is memoized or already running.

    Process jobs go to one of three lanes, each its own pool: "interactive" (short jobs a page
    waits on, e.g. a new image's BPD; torch uses every core), "requested" (minutes-long jobs a
    visitor asked for: an image's exact replay, a retrain on Verify) and "background" (what the
    app makes on its own: the galleries, a representation; nice 19). The last two share the
    cores: half each while both compute, all of them to the one that computes alone (a replay
    of the `cpu` model's training: 116.6 ms a step on 2 threads against 154.5 ms on 1 on an AMD
    EPYC, results/bench_lane_threads.txt), taken up at the job's next progress report when the other starts or ends. A
    BPD therefore never queues behind a minutes-long attribution, a visitor's replay never
    behind the galleries, and while an interactive job computes the other lanes are paused, so
    that several processes never spin full sets of torch threads on the same cores (that runs
    many times slower).

    Args:
        memo: where results are kept (and found: a memoized key starts no job).
        workers: 0 runs jobs in threads of this process; n > 0 in n spawned processes per lane.
    """

    SHARED = ("requested", "background")  # the lanes that share the cores (see the class docstring)

    def __init__(self, memo: Memo, workers: int = 0):
        self.memo = memo
        self.workers = workers
        cores = os.cpu_count() or 1
        half = max(1, cores // 2)
        self.cores = cores
        # lane -> torch threads at a worker's start; the two shared lanes' are set per job (_share_cores)
        self.lanes = {"interactive": cores, "requested": half, "background": half}
        self._computing = {lane: 0 for lane in self.SHARED}  # process jobs computing now, per shared lane
        self._pools: dict[str, cf.ProcessPoolExecutor] = {}
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []  # cancelled jobs leave the table, not this list
        self._manager = None
        self._shared = None  # the manager's dict: progress and cancel flags between processes
        self._interactive = 0  # interactive process jobs computing now; the other lanes are paused while > 0
        self._stopping = False  # set by shutdown(): a job that then loses its worker or manager was cut short

    def submit(self, key: str, fn: Callable[[Callable[[dict], None]], dict], label: str = "",
               lane: str = "background", owner: Optional[str] = None) -> Job:
        """Start fn(callback) -> dict for `key` unless memoized or running; `lane` picks the
        worker pool ("interactive" for short jobs a page waits on, "requested" for long ones a
        visitor asked for, "background" for the rest). `owner` names who asks (a session): the
        job then stops once every owner has released it (`release`) before it is done; asked for
        without an owner, it always runs to its end."""
        if lane not in self.lanes:
            raise ValueError(f"unknown lane {lane!r}")
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.error:
                self._claim(job, owner)
                return job
            job = Job(key, label, lane=lane)
            self._claim(job, owner)
            hit = self.memo.get(key)
            if hit is not None:
                job.result, job.done, job.stage = hit, True, "done"
            else:
                t = threading.Thread(target=self._run, args=(job, fn, lane), daemon=True, name=f"job {label}")
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
                t.start()
            self._jobs[key] = job
            self._forget_finished()
            return job

    @staticmethod
    def _claim(job: Job, owner: Optional[str]) -> None:
        if owner is None:
            job.pinned = True
        else:
            job.owners.add(owner)

    def _forget_finished(self, keep: int = 256) -> None:
        """Drop the oldest finished jobs past `keep` (their results stay in the memo, where peek
        finds them): a long-running server does not hold every result it ever made in memory."""
        done = [k for k, j in self._jobs.items() if j.done]
        for k in done[: max(0, len(done) - keep)]:
            del self._jobs[k]

    def peek(self, key: str) -> Optional[Job]:
        """The job for `key` if one was submitted in this process, else a finished one from the memo."""
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            hit = self.memo.get(key)
            if hit is not None:
                job = Job(key, "", stage="done", done=True, result=hit)
        return job

    def cancel(self, key: str) -> None:
        """Stop a running job at its next progress report (e.g. the BPD of a drawing that changed);
        it leaves the table, so asking for the key again starts afresh."""
        with self._lock:
            self._cancel(key)

    def release(self, key: str, owner: str) -> None:
        """`owner` no longer waits for `key` (its visitor moved on to another image). The job is
        cancelled when nobody else waits for it: no other session asked for it and nothing asked
        without an owner. A visitor who clicks through ten digits thus waits for the last one's
        computation alone, not for the nine before it, while a digit another visitor also looks at
        keeps computing."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.done or owner not in job.owners:
                return
            job.owners.discard(owner)
            if not job.owners and not job.pinned:
                self._cancel(key)

    def _cancel(self, key: str) -> None:
        """cancel() with the lock held."""
        job = self._jobs.get(key)
        if job is not None and not job.done:
            job.cancelled = True
            del self._jobs[key]
            if self._shared is not None:
                self._shared[("cancel", job.token)] = True

    def wait_all(self, timeout: float = 600.0) -> bool:
        """Block until every submitted job is done (for tests and clean shutdowns); True if all are."""
        end = time.time() + timeout
        while time.time() < end:
            with self._lock:
                if not any(t.is_alive() for t in self._threads):
                    return True
            time.sleep(0.05)
        return False

    def _start_pool(self, lane: str) -> cf.ProcessPoolExecutor:
        with self._lock:
            ctx = multiprocessing.get_context("spawn")  # fork is unsafe with threads and torch's pools
            if self._manager is None:
                self._stopping = False  # started (again) after a shutdown: errors are the jobs' own again
                with _neutral_main():
                    self._manager = SyncManager(ctx=ctx)
                    self._manager.start(exit_with_parent)
                self._shared = self._manager.dict()
                # At interpreter exit (the server stopped by SIGTERM or Ctrl-C), concurrent.futures
                # joins its pools' manager threads, which wait for running jobs to finish: minutes.
                # Threading's exit hooks run last-registered first, so this one, registered after
                # concurrent.futures', stops the workers before that join. A job cut short stores
                # nothing (the memo writes whole results) and is computed again when next asked.
                threading._register_atexit(self.shutdown)
            if lane not in self._pools:
                self._pools[lane] = cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_lane_init,
                                                           initargs=(self.lanes[lane], 19 if lane == "background" else 0))
            return self._pools[lane]

    def warm(self, fn: Callable[[], None]) -> None:
        """Start every lane's worker processes now and run `fn` (e.g. imports) in each, so that the
        first real job does not pay for starting Python and torch. No-op without workers."""
        if self.workers:
            for lane in self.lanes:
                pool = self._start_pool(lane)
                with _neutral_main():  # processes start on submit
                    for _ in range(self.workers):
                        pool.submit(fn)

    def _signal_background(self, sig: str) -> None:
        """Send signal `sig` ("SIGSTOP", "SIGCONT") to every worker of the lanes that an
        interactive job pauses, and to the processes those workers started (a job that runs an
        engine.executor pool of its own), parents first, so that a worker is stopped
        before it could start another (nothing where pausing is not possible)."""
        if not _CAN_PAUSE:
            return
        workers = [p.pid for lane, pool in list(self._pools.items()) if lane != "interactive"
                   for p in list(getattr(pool, "_processes", {}).values())]
        for pid in workers + _descendants(workers):
            try:
                os.kill(pid, getattr(signal, sig))
            except (ProcessLookupError, TypeError):  # exited, or not started yet
                pass

    def _pause_background(self, on: bool) -> None:
        """Pause the other lanes' workers (SIGSTOP) while an interactive job computes, and
        resume them (SIGCONT) when the last one ends. At nice 19 they still cost a drawing's job
        memory bandwidth and cache on a small machine; paused, they cost nothing, and they lose
        nothing either (their jobs continue where they stopped). POSIX only; elsewhere a no-op."""
        if not _CAN_PAUSE:
            return
        with self._lock:
            self._interactive += 1 if on else -1
            if (on and self._interactive == 1) or (not on and self._interactive == 0):
                self._signal_background("SIGSTOP" if on else "SIGCONT")

    def _share_cores(self, lane: str, delta: int) -> None:
        """One more (delta 1) or one fewer (-1) job computing in shared `lane`; then every job of
        the two shared lanes gets its part of the cores: the lanes computing split them evenly,
        and a lane's part is split among its jobs (at least one thread each). The workers take
        their count up at their next progress report (_in_worker)."""
        with self._lock:
            self._computing[lane] += delta
            busy = [name for name in self.SHARED if self._computing[name] > 0]
            for name in busy if self._shared is not None else ():  # (None: the server is stopping)
                self._shared[("threads", name)] = max(1, self.cores // len(busy) // self._computing[name])

    def background_paused(self) -> bool:
        """Whether the non-interactive lanes are paused now (an interactive job is computing)."""
        return self._interactive > 0

    def shutdown(self) -> None:
        """Stop the worker processes (running jobs are lost; their keys simply start again later)."""
        self._stopping = True
        self._signal_background("SIGCONT")  # a stopped process would not act on SIGTERM
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            for p in list(getattr(pool, "_processes", {}).values()):
                p.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.shutdown()
            self._shared = None

    def _compute(self, job: Job, fn, lane: str) -> dict:
        if not self.workers:
            return fn(job.update)
        pool = self._start_pool(lane)
        shared = self._shared
        pause = lane == "interactive"
        shares = lane in self.SHARED
        if pause:
            self._pause_background(True)
        if shares:  # before the worker starts the job: it reads its thread count first
            self._share_cores(lane, 1)
        with _neutral_main():  # processes start on submit
            future = pool.submit(_in_worker, pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL), job.token, shared,
                                 lane)
        if not pause:
            with self._lock:  # a worker the pool started just now, while an interactive job computes
                if self._interactive > 0:
                    self._signal_background("SIGSTOP")
        try:
            while True:
                try:
                    result = pickle.loads(future.result(timeout=0.2))
                    info = shared.get(job.token)
                    if info:
                        job.update(info)  # the last report, which polling may have missed
                    return result
                except cf.TimeoutError:
                    info = shared.get(job.token)
                    if info:
                        job.update(info)  # raises Cancelled once the job is cancelled
                    elif job.cancelled:
                        raise Cancelled(job.key)
        except Cancelled:
            shared[("cancel", job.token)] = True
            future.cancel()
            raise
        except cf.process.BrokenProcessPool:
            # a worker died (killed, out of memory): the next job gets a fresh pool
            with self._lock:
                if self._pools.get(lane) is pool:
                    del self._pools[lane]
            raise RuntimeError("the worker process running this job died; ask again to retry") from None
        finally:
            if pause:
                self._pause_background(False)
            if shares:
                self._share_cores(lane, -1)
            shared.pop(job.token, None)

    def _run(self, job: Job, fn, lane: str) -> None:
        try:
            job.stage = "starting"
            job.result = self.memo.get_or_compute(job.key, lambda: self._compute(job, fn, lane))
            job.stage = "done"
        except Cancelled:
            job.error = "cancelled"
        except UserError as e:
            job.error = str(e)
        except Exception as e:  # shown as one line in the app; the trace goes to the server log
            if self._stopping:  # the server is stopping: its manager and workers are gone, no error of the job's
                job.error = "stopped with the server"
                return
            traceback.print_exc()
            job.error = f"{type(e).__name__}: {e}"
        finally:
            job.done = True
