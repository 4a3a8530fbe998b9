"""Linear datamodeling score: do an attribution method's predictions rank actual retrainings?

For every query the actual change BPD_S - BPD under retraining without a set S (protocols in
engine.experiments.protocols) is compared with the method's predicted change -sum_{i in S}
score[i] by Spearman's rank correlation. Any method of the registry (engine.methods) goes
through the same code.

The folder `out` makes it resumable and shares everything between methods and protocols:
  scores/<method>.npz                 each method's scores (Q, n), stamped with run and queries
  bpd.npz                             the full model's BPD of the queries
  bank/                               the retrained BPDs (engine.experiments.bank), never redone
  reports/<method>_<A|B>.json, .png   each (method, protocol)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from engine import data, methods, provenance
from engine.errors import UserError
from engine.experiments import bank, plots, protocols, stats
from engine.files import load_or_compute
from engine.store import Run


def method_scores(run: Run, out: Path, method: methods.Method, queries: list[int], x: torch.Tensor,
                  callback=None) -> dict:
    """{"scores" (Q, n), "seconds", and "bpd" (Q,) if the method gives it}, from
    out/scores/<name>.npz when it was made for this run, these queries and the method's cache_key."""
    def compute() -> dict:
        t0 = time.perf_counter()
        method.prepare(run, callback=callback)
        s = method.score(run, x, callback=callback)
        extra = {} if s.bpd is None else {"bpd": s.bpd}
        return {"scores": s.scores, "seconds": time.perf_counter() - t0, **extra}
    key = {"run_digest": run.digest, "queries": queries, **method.cache_key(run)}
    return load_or_compute(Path(out) / "scores" / f"{method.name}.npz", key, compute,
                           what=f"{method.name} scores of {len(queries)} queries")


def reference_bpd(run: Run, out: Path, queries: list[int], x: torch.Tensor, known: Optional[np.ndarray] = None
                  ) -> np.ndarray:
    """The full model's BPD (Q,) of the queries, kept in out/bpd.npz (`known`: already computed)."""
    from engine.bpd import run_bpd
    return load_or_compute(Path(out) / "bpd.npz", {"run_digest": run.digest, "queries": queries},
                           lambda: {"bpd": known if known is not None else run_bpd(run, x)[0]},
                           what="the queries' BPD under the full model")["bpd"]


def report_path(out: Path, method: str, protocol: str) -> Path:
    return Path(out) / "reports" / f"{method}_{protocol}.json"


def run_lds(run: Run, out: Path, queries: Sequence[int], *, method: str = "magic", protocol: str = "A",
            k: int = 50, frac: float = 0.01, alpha: float = 0.5, seeds: int = 3, seed: int = 0,
            jobs: int = 1, executor=None, callback: Optional[Callable[[dict], None]] = None) -> dict:
    """LDS of `method` (a name in engine.methods) for test-set `queries` (Q indices) on a
    finished run; writes `out` (see the module docstring) and returns the report.

    protocol "A": K drop-sets of ceil(frac * n) images, each retrained once with the run's seed.
    protocol "B": K subsets keeping round(alpha * n) images, each retrained with `seeds` seeds
    (run.seed, run.seed + 1, ...) and the BPDs averaged. Either way the prediction is
    BPD(1) - sum over the dropped images of the scores (for B this ranks subsets exactly as the
    literature's sum over the kept images does: the two differ by a constant per query).

    Retrains run on `executor` (engine.executor; default: `jobs` local worker processes).
    callback gets the method's progress while scores are computed, then {"stage": "retrain",
    "i", "n"} as retrains finish.
    """
    m = methods.get(method)
    p = run.preset
    plan = protocols.plan(protocol, p.n_train, k, frac=frac, alpha=alpha, seeds=seeds, seed=seed)
    queries = [int(q) for q in queries]
    test_x, test_y = data.load_test()
    if any(not 0 <= q < len(test_x) for q in queries):
        raise UserError(f"query indices must be in [0, {len(test_x)})")
    x = test_x[queries]
    out = Path(out)
    cb = callback or (lambda info: None)
    s = method_scores(run, out, m, queries, x, cb)
    bpd = reference_bpd(run, out, queries, x, s.get("bpd"))
    if executor is None:
        from engine.executor import LocalExecutor
        executor = LocalExecutor(jobs)
    by_seed = bank.retrained(run, out, queries, plan.drops, plan.seeds, protocol=protocol, settings=plan.settings,
                             executor=executor, callback=cb)                          # (S, Q, K)
    actual = by_seed.mean(0) - bpd[:, None]                                           # (Q, K)
    predicted = stats.predicted_changes(s["scores"], plan.drops)                      # (Q, K)
    rows = stats.per_query(queries, test_y[queries].numpy(), bpd, predicted, actual)
    rhos = np.array([r["spearman"] for r in rows])
    report = {"protocol": protocol, "method": m.name, "units": m.units, "preset": p.name, "run_digest": run.digest,
              "n_train": p.n_train, "drop_sets": len(plan.drops), "drop_size": int(plan.drops.shape[1]), "seed": seed,
              "spearman_mean": float(rhos.mean()), "spearman_std": float(rhos.std()),
              "spearman_min": float(rhos.min()), "score_seconds": float(s["seconds"]), "queries": rows,
              **provenance.stamp()}
    report |= {"frac": frac} if protocol == "A" else {"alpha": alpha, "seeds": plan.seeds,
                                                      **stats.seed_breakdown(predicted, by_seed, run.seed)}
    from engine import atomic
    path = report_path(out, m.name, protocol)
    atomic.save_json(report, path)
    atomic.save_bytes(plots.scatter_png(report), path.with_suffix(".png"))
    return report
