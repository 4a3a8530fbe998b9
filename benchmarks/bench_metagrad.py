"""Cost of MAGIC against training the same preset, as ratios measured in one process.

    python benchmarks/bench_metagrad.py [--preset small] [--queries 8] [--out results/bench_metagrad.txt]

Times, in this order and in this process: training the preset into a run folder (the
baseline, checkpoint writes included); the metagradient through that run for 1 query and for
Q batched queries with the default stored-checkpoint scheme; the same with the "segment"
scheme (a segment's step graphs kept: no separate replay); the k-ary scheme (k=4) for 1
query; and the exact-BPD parameter gradient of one query (the other half of attributing a new
image). The query functionals are random directions in parameter space: the sweep's cost does
not depend on them.

Memory: the peak resident set (CPU) or peak allocated GPU memory of each stage above what the
process held when the stage began, sampled every 2 ms from /proc/self/statm. Each metagradient
and BPD stage runs in a fresh process of its own (spawned; it loads the run and makes the same
queries), so that no stage reuses memory an earlier one left with the allocator and reads as
needing none.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import data, provenance, training as train  # noqa: E402
from engine import device as devices  # noqa: E402
from engine.bpd import run_bpd  # noqa: E402
from engine.metagrad import metagradient  # noqa: E402
from engine.presets import get_preset  # noqa: E402
from engine.store import load_run  # noqa: E402


class Peak:
    """Peak extra memory (MB) of a `with` block: RSS sampled on CPU, the allocator's peak on CUDA."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self.rss()
            self.stop = False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop = True
            self.thread.join()
        self.seconds = time.perf_counter() - self.t0
        self.mb = (self.peak - self.base) / 2**20


class Timed:
    """A stage's seconds and peak extra MB, as measured in its own process."""

    def __init__(self, seconds: float, mb: float):
        self.seconds, self.mb = seconds, mb


def _stage(run_dir: str, name: str, queries: int, cuda: bool) -> tuple[float, float]:
    """One stage in this (fresh) process: (seconds, peak extra MB). The queries are random
    directions in parameter space (seed 0), the same in every process."""
    run = load_run(Path(run_dir))
    devices.setup(run.preset)
    images, _ = data.load_train(run.preset.n_train, run.preset.source)
    g = torch.Generator().manual_seed(0)
    final = run.load_final().model_params
    qs = [{n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in final.items()} for _ in range(queries)]
    kw = {"sqrt1": ({}, qs[:1]), "segment1": ({"scheme": "segment"}, qs[:1]), "sqrtQ": ({}, qs),
          "segmentQ": ({"scheme": "segment"}, qs), "kary": ({"scheme": "kary", "k": 4}, qs[:1])}
    with Peak(cuda) as m:
        if name == "bpd":
            run_bpd(run, data.load_test()[0][:1], grad=True)
        else:
            metagradient(run, images, kw[name][1], **kw[name][0])
    return m.seconds, m.mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    ap.add_argument("--steps", type=int, help="train for fewer steps than the preset: every cost here is per "
                    "step, so the ratios hold (checkpoints every ~sqrt(steps))")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--stages", default="sqrt1,segment1,sqrtQ,segmentQ,kary,bpd",
                    help="comma-separated subset of sqrt1,segment1,sqrtQ,segmentQ,kary,bpd (training always runs)")
    a = ap.parse_args()
    stages = set(a.stages.split(","))
    known = {"sqrt1", "segment1", "sqrtQ", "segmentQ", "kary", "bpd"}
    if not stages <= known or a.queries < 1 or (a.steps is not None and a.steps < 2):
        sys.exit(f"error: --stages takes a comma-separated subset of {','.join(sorted(known))}; --queries must be >= 1 "
                 "and --steps >= 2")
    provenance.start()
    preset = get_preset(a.preset)
    if a.device:
        preset = dataclasses.replace(preset, device=a.device)
    if a.steps:
        preset = dataclasses.replace(preset, steps=a.steps)
    cuda = devices.resolve(preset).type == "cuda"
    images, _ = data.load_train(preset.n_train, preset.source)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with Peak(cuda) as m:
            train.train(preset, seed=0, out=Path(tmp) / "run", images=images)
        rows.append(("training (baseline)", m))
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        for name, label in (
                ("sqrt1", "metagradient, 1 query"),
                ("segment1", "metagradient, 1 query, segment graphs kept"),
                ("sqrtQ", f"metagradient, {a.queries} batched queries"),
                ("segmentQ", f"metagradient, {a.queries} queries, segment graphs kept"),
                ("kary", "metagradient, 1 query, k-ary (k=4)"),
                ("bpd", "exact BPD + its parameter gradient, 1 query")):
            if name not in stages:
                continue
            with ctx.Pool(1) as pool:
                seconds, mb = pool.apply(_stage, (str(Path(tmp) / "run"), name, a.queries, cuda))
            rows.append((label, Timed(seconds, mb)))
    dev = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    base = rows[0][1].seconds
    one = next((m.seconds for label, m in rows if label == "metagradient, 1 query"), rows[1][1].seconds)
    lines = [f"# bench_metagrad: preset {preset.name} (n={preset.n_train}, T={preset.steps}, "
             f"B={preset.batch_size}), {dev}, torch {torch.__version__}",
             f"{'stage':48s} {'seconds':>9s} {'/ train':>8s} {'/ 1 query':>9s} {'peak MB':>8s}"]
    for label, m in rows:
        lines.append(f"{label:48s} {m.seconds:9.2f} {m.seconds / base:8.2f} {m.seconds / one:9.2f} {m.mb:8.1f}")
    print("\n".join(lines))
    if a.out:
        provenance.save_table(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
