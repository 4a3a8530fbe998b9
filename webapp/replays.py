"""The app's own precomputed replay: made in the background from the first start, with progress.

APP_PRECOMPUTE_RANK (default 64; 0 turns it off) is the size K of the representation
(engine.precompute) made for the app's run when it has none that passes its checks, and
APP_PRECOMPUTE_METHOD its method: "basis" (K replayed images, the default: on `small` a 64-image
basis measured LDS 0.90 against exact MAGIC's 0.975, a rank-64 range finder 0.34;
results/precompute/fidelity.md) or "lowrank". The default model's representation is shipped in
the repository (engine.precompute.shipped), so this job only runs for another model, or when the
shipped file does not match the run's weights. It runs as one background job in chunks that
survive a restart (a stopped server resumes with the next chunk), so every page can say how long
it has left.
"""

from __future__ import annotations

import functools
import time
from typing import Optional

from cache import make_key
from engine.store import Run
from webapp.service import Callback, jobs, precomputed, setting


def rank() -> int:
    """APP_PRECOMPUTE_RANK: the images (or directions) of the representation the app makes (64; 0: none)."""
    return setting("APP_PRECOMPUTE_RANK")


def method() -> str:
    """APP_PRECOMPUTE_METHOD: "basis" (a query basis of K images, the default) or "lowrank"."""
    return setting("APP_PRECOMPUTE_METHOD")


def _state(run: Run) -> list:
    """What the run's representation folder holds (names and mtimes): a job's key, so that a
    removed representation is made again rather than found in the memo."""
    from engine.precompute import representation
    folder = representation.folder(run)
    return sorted([str(p.relative_to(folder)), p.stat().st_mtime_ns] for p in folder.glob("*.npz")) if folder.is_dir() else []


def _precompute(run: Run, k: int, cb: Callback, how: str = "lowrank") -> dict:
    from engine.executor import InlineExecutor
    from engine.precompute.build import precompute
    chunks = -(-k // 8)  # per stage, at the default chunk of 8 directions or images

    def progress(info: dict) -> None:  # the first stage's chunks (forward or gradients), then reverse, as one count
        done = info["i"] + (chunks if info["stage"] == "reverse" else 0)
        cb({"stage": "making the precomputed replay", "i": done, "n": 2 * chunks})
    k = min(k, run.preset.n_train) if how == "lowrank" else k
    # in the lane's own worker (webapp.jobs): its share of the cores, taken up at each chunk's
    # report, and paused with it; a pool of its own would compute on every core beside the others
    info = precompute(run, method=how, rank=k, executor=InlineExecutor(), callback=progress)
    return {k2: v for k2, v in info.items() if isinstance(v, (int, float, str))}


def job_key(run: Run) -> str:
    return make_key("precompute", run.digest, None, {"rank": rank(), "method": method(), "files": _state(run)})


def job(run: Run):
    """The background job making the app's representation, or None when the run has a valid
    one or it is turned off."""
    k = rank()
    if k <= 0 or precomputed(run)[0] is not None:
        return None
    return jobs().submit(job_key(run), functools.partial(_precompute, run, k, how=method()), label="precomputed replay")


def time_left(j) -> Optional[str]:
    """'about N min left' from the chunks this job has done so far (None before the first)."""
    if j is None or j.done or not j.n or j.i <= 0:
        return None
    per = (time.time() - j.started) / j.i
    return f"about {max(1, round(per * (j.n - j.i) / 60))} min left"
