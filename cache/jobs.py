"""Background jobs with progress, one per key, shared by every session of the server process."""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

from cache.memo import Memo
from engine.errors import UserError


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

    @property
    def fraction(self) -> Optional[float]:
        return None if not self.n else min(1.0, self.i / self.n)

    def update(self, info: dict) -> None:
        """The engine's callback={...} convention: {"stage"?, "i", "n"}."""
        if self.cancelled:
            raise Cancelled(self.key)
        self.stage = info.get("stage", self.stage)
        self.i, self.n = info.get("i", self.i), info.get("n", self.n)


class Jobs:
    """Starts `fn(callback) -> dict` in a thread unless its key is memoized or already running."""

    def __init__(self, memo: Memo):
        self.memo = memo
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []  # cancelled jobs leave the table, not this list

    def submit(self, key: str, fn: Callable[[Callable[[dict], None]], dict], label: str = "") -> Job:
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.error:
                return job
            job = Job(key, label)
            hit = self.memo.get(key)
            if hit is not None:
                job.result, job.done, job.stage = hit, True, "done"
            else:
                t = threading.Thread(target=self._run, args=(job, fn), daemon=True, name=f"job {label}")
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
                t.start()
            self._jobs[key] = job
            return job

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
            job = self._jobs.get(key)
            if job is not None and not job.done:
                job.cancelled = True
                del self._jobs[key]

    def wait_all(self, timeout: float = 600.0) -> bool:
        """Block until every submitted job is done (for tests and clean shutdowns); True if all are."""
        end = time.time() + timeout
        while time.time() < end:
            with self._lock:
                if not any(t.is_alive() for t in self._threads):
                    return True
            time.sleep(0.05)
        return False

    def _run(self, job: Job, fn) -> None:
        try:
            job.stage = "starting"
            job.result = self.memo.get_or_compute(job.key, lambda: fn(job.update))
            job.stage = "done"
        except Cancelled:
            job.error = "cancelled"
        except UserError as e:
            job.error = str(e)
        except Exception as e:  # shown as one line in the app; the trace goes to the server log
            traceback.print_exc()
            job.error = f"{type(e).__name__}: {e}"
        finally:
            job.done = True
