"""What a long job of the app gains from every core: the exact replay of a run's training (one
query's metagradient) and a new image's BPD with its gradient, on 1 thread and on all of them,
timed in one process.

    python benchmarks/bench_lane_threads.py --run runs/cpu [--seconds 60] [--out results/bench_lane_threads.txt]

The app's "requested" lane (a visitor's exact replay, a retrain) and its "background" lane (the
galleries, a representation) share the cores: half each while both compute, all of them to the
one computing alone (webapp.jobs). This prints why that matters: milliseconds per training step
of the replay (over the first `--seconds` of the sweep, after its first step; the steps cost
alike) and seconds per BPD with its gradient (test digit 0, best of 2; its divergence pieces go to
as many threads as torch has, engine.likelihood), at each thread count, switched in this very
process with torch.set_num_threads as the app's workers switch, and the ratio to 1 thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, data, provenance  # noqa: E402
from engine.bpd import run_bpd  # noqa: E402
from engine.metagrad import metagradient  # noqa: E402
from engine.store import load_run  # noqa: E402


class _Enough(Exception):
    pass


def replay_ms_per_step(run, images: torch.Tensor, grads: list, seconds: float) -> tuple[float, int]:
    """Milliseconds per training step of the metagradient's sweep, over `seconds` after its first
    report, and how many steps that was (the sweep is stopped there)."""
    marks: dict = {}

    def cb(info: dict) -> None:
        now = time.perf_counter()
        marks.setdefault("first", (now, info["i"]))
        marks["last"] = (now, info["i"])
        if now - marks["first"][0] > seconds:
            raise _Enough
    try:
        metagradient(run, images, grads, callback=cb)
    except _Enough:
        pass
    (t0, i0), (t1, i1) = marks["first"], marks["last"]
    return 1000 * (t1 - t0) / max(1, i1 - i0), i1 - i0


def bpd_grad_s(run, x: torch.Tensor) -> float:
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        run_bpd(run, x, grad=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/cpu")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to time the replay at each count")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    provenance.start()  # the code that runs is the checkout now, not minutes later when the table is written
    run = load_run(a.run)
    images, _ = data.load_train(run.preset.n_train, run.preset.source)
    x = data.load_test()[0][:1]
    counts = sorted({1, os.cpu_count() or 1})
    rows = []
    for n in counts:
        torch.set_num_threads(n)
        _, grads = run_bpd(run, x, grad=True)
        ms, steps = replay_ms_per_step(run, images, grads, a.seconds)
        rows.append((n, ms, steps, bpd_grad_s(run, x)))
    lines = [provenance.header(),
             f"# run {a.run} (preset {run.preset.name}, {run.preset.steps} steps); measured on {provenance.machine()}",
             f"{'threads':>7s} {'replay ms/step':>15s} {'(steps timed)':>14s} {'x 1 thread':>11s} "
             f"{'BPD+grad s':>11s} {'x 1 thread':>11s} {'replay of all steps, s':>23s}"]
    for n, ms, steps, s in rows:
        lines.append(f"{n:7d} {ms:15.1f} {steps:14d} {rows[0][1] / ms:10.2f}x {s:11.2f} {rows[0][3] / s:10.2f}x "
                     f"{ms * run.preset.steps / 1000:23.0f}")
    atomic.print_report(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
