"""Linear datamodeling score: do an attribution method's predictions rank actual retrainings?

Protocol A (the seed's): K random drop-sets, each a fraction `frac` of the training set, are
removed in turn and the model retrained with the run's seed (same batches, same noise: only the
dropped examples' weights change). Protocol B (the diffusion-attribution literature's): K random
subsets keeping a fraction alpha, each retrained with several seeds and the BPDs averaged. For
every query the actual change BPD_S - BPD is compared with the predicted change
-sum_{i dropped} score[i] by Spearman's rank correlation.

The folder `out` makes it resumable and shares everything between methods:
  attribution.npz            MAGIC's grad_w, bpd, queries, seconds
  scores/<method>.npz        each baseline's scores (engine.baselines), seconds
  bpd.json                   the full model's BPD of the queries when MAGIC has not run
  retrains/, retrains_b/     one JSON per finished retrain (protocol A, B), never redone
  lds.json, lds.png, scatter/   MAGIC on protocol A
  reports/<method>_<A|B>.json/.png   every other (method, protocol)
Retrains run in `jobs` worker processes that split the machine's cores.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from engine import atomic, data
from engine.errors import UserError
from engine.presets import Preset, preset_from_dict
from engine.store import Run


def drop_sets(n: int, k: int, frac: float, seed: int) -> np.ndarray:
    """(K, m) sorted training indices, m = ceil(frac * n) (DESIGN.md), no repeats within a set."""
    if not 0 < frac < 1:
        raise UserError(f"--frac must be between 0 and 1, got {frac}")
    if k < 3:
        raise UserError(f"--drop-sets must be at least 3 for a rank correlation, got {k}")
    m = max(1, math.ceil(frac * n - 1e-9))
    rng = np.random.default_rng([seed, n, m])
    return np.stack([np.sort(rng.choice(n, m, replace=False)) for _ in range(k)])


def retrain_bpd(preset: Preset, seed: int, drop: np.ndarray, queries: torch.Tensor,
                images: Optional[torch.Tensor] = None) -> np.ndarray:
    """Exact BPD (Q,) of `queries` (Q, 1, 28, 28) under the preset retrained without `drop`."""
    from engine import train
    from engine.likelihood import bits_per_dim
    if images is None:
        images, _ = data.load_train(preset.n_train, preset.source)
    w = np.ones(images.shape[0], np.float32)
    w[drop] = 0.0
    state = train.train(preset, seed=seed, weights=w, images=images)
    model = train.make_model(preset, seed)
    model.load_state_dict({k: v.cpu() for k, v in state.params.items()})
    with torch.no_grad():
        return np.array([bits_per_dim(model.eval(), q[None].to(preset.torch_dtype), **preset.likelihood_kwargs).item()
                         for q in queries])


def _retrain_job(preset_dict: dict, seed: int, drop: np.ndarray, queries: np.ndarray, path: str) -> str:
    """One retrain in a worker process; its result file is written atomically at the end."""
    bpd = retrain_bpd(preset_from_dict(preset_dict), seed, drop, torch.from_numpy(queries))
    atomic.save_json({"drop": drop.tolist(), "bpd": bpd.tolist()}, Path(path))
    return path


def keep_sets(n: int, k: int, alpha: float, seed: int) -> np.ndarray:
    """(K, m) sorted indices each protocol-B subset keeps, m = round(alpha * n)."""
    if not 0 < alpha < 1:
        raise UserError(f"--alpha must be between 0 and 1, got {alpha}")
    if k < 3:
        raise UserError(f"--subsets must be at least 3 for a rank correlation, got {k}")
    m = max(1, round(alpha * n))
    rng = np.random.default_rng([seed, n, m, 1])
    return np.stack([np.sort(rng.choice(n, m, replace=False)) for _ in range(k)])


def _attribution(run: Run, out: Path, queries: list[int], x: torch.Tensor, callback) -> tuple[np.ndarray, np.ndarray, Optional[float]]:
    """grad_w (Q, n), BPD (Q,) and the seconds they took, from out/attribution.npz if it matches
    this run and these queries."""
    from engine.attribution import attribute
    path = out / "attribution.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["run_digest"]) == run.digest and f["queries"].tolist() == queries:
                    return f["grad_w"], f["bpd"], (float(f["seconds"]) if "seconds" in f else None)
        except Exception:
            pass  # unreadable or from another run: recompute
    t0 = time.perf_counter()
    grad_w, bpd = attribute(run, x, callback=callback)
    sec = time.perf_counter() - t0
    atomic.save_npz(path, grad_w=grad_w, bpd=bpd, queries=np.array(queries), run_digest=np.array(run.digest),
                    seconds=np.array(sec))
    return grad_w, bpd, sec


def _baseline_scores(run: Run, out: Path, method: str, queries: list[int], x: torch.Tensor, callback
                     ) -> tuple[np.ndarray, float]:
    """A baseline's scores (Q, n) and seconds, kept in out/scores/<method>.npz."""
    from engine import baselines
    path = out / "scores" / f"{method}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["run_digest"]) == run.digest and f["queries"].tolist() == queries:
                    return f["scores"], float(f["seconds"])
        except Exception:
            pass
    t0 = time.perf_counter()
    s = baselines.scores(method, run, x, callback=callback)
    sec = time.perf_counter() - t0
    atomic.save_npz(path, scores=s, queries=np.array(queries), run_digest=np.array(run.digest), seconds=np.array(sec))
    return s, sec


def _reference_bpd(run: Run, out: Path, queries: list[int], x: torch.Tensor) -> np.ndarray:
    """The full model's BPD (Q,) of the queries: MAGIC's, else out/bpd.json (computed once)."""
    from engine.likelihood import bits_per_dim
    try:
        with np.load(out / "attribution.npz", allow_pickle=False) as f:
            if str(f["run_digest"]) == run.digest and f["queries"].tolist() == queries:
                return f["bpd"]
    except Exception:
        pass  # missing, unreadable or another run's
    path = out / "bpd.json"
    try:
        r = json.loads(path.read_text())
        if r["run_digest"] == run.digest and r["queries"] == queries:
            return np.array(r["bpd"])
    except (OSError, ValueError, KeyError):
        pass
    model, p = run.model().eval(), run.preset
    with torch.no_grad():
        bpd = np.array([bits_per_dim(model, q[None].to(p.torch_dtype), **p.likelihood_kwargs).item() for q in x])
    atomic.save_json({"run_digest": run.digest, "queries": queries, "bpd": bpd.tolist()}, path)
    return bpd


def report_path(out: Path, method: str, protocol: str) -> Path:
    """Where run_lds writes a report: out/lds.json for MAGIC on protocol A (with lds.png and
    scatter/), out/reports/<method>_<protocol>.json (and .png) otherwise."""
    if method == "magic" and protocol == "A":
        return Path(out) / "lds.json"
    return Path(out) / "reports" / f"{method}_{protocol}.json"


def _retrain_bank(run: Run, out: Path, queries: list[int], x: torch.Tensor, protocol: str, drops: np.ndarray,
                  seeds: int, stamp: dict, executor, jobs: int, cb) -> np.ndarray:
    """Retrained BPD (S, Q, K) of every drop (K, m) for each of `seeds` seeds (run.seed + s);
    one file per (drop, seed), never redone while the stamp holds."""
    folder = out / ("retrains" if protocol == "A" else "retrains_b")
    folder.mkdir(parents=True, exist_ok=True)

    def result_path(j: int, s: int) -> Path:
        # protocol A keeps its original names (one seed): existing banks stay valid
        return folder / (f"set_{j:03d}.json" if protocol == "A" else f"set_{j:03d}_seed_{s}.json")

    def load_result(j: int, s: int) -> Optional[np.ndarray]:
        try:
            r = json.loads(result_path(j, s).read_text())
            if r["drop"] == drops[j].tolist() and len(r["bpd"]) == len(queries):
                return np.array(r["bpd"])
        except (OSError, ValueError, KeyError):
            pass
        return None

    # a result is tied to its drop-set and query count; the folder is tied to the run and queries
    stamp_path = folder / "stamp.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) != stamp:
        for f in folder.glob("set_*.json"):
            f.unlink()
    atomic.save_json(stamp, stamp_path)
    pairs = [(j, s) for j in range(len(drops)) for s in range(seeds)]
    todo = [(j, s) for j, s in pairs if load_result(j, s) is None]
    done = len(pairs) - len(todo)
    cb({"stage": "retrain", "i": done, "n": len(pairs)})
    if todo:
        from engine.executor import LocalExecutor
        ex = executor or LocalExecutor(jobs)
        p = run.preset
        for _ in ex.run(_retrain_job, [(p.to_dict(), run.seed + s, drops[j], x.numpy(), str(result_path(j, s)))
                                       for j, s in todo]):
            done += 1
            cb({"stage": "retrain", "i": done, "n": len(pairs)})
    return np.stack([np.stack([load_result(j, s) for j in range(len(drops))], axis=1) for s in range(seeds)])


def run_lds(run: Run, out: Path, queries: Sequence[int], *, method: str = "magic", protocol: str = "A",
            k: int = 50, frac: float = 0.01, alpha: float = 0.5, seeds: int = 3, seed: int = 0,
            jobs: int = 1, executor=None, callback: Optional[Callable[[dict], None]] = None) -> dict:
    """LDS of `method` ("magic" or one of engine.baselines.METHODS) for test-set `queries`
    (Q indices) on a finished run; writes `out` (see the module docstring) and returns the report.

    protocol "A": K drop-sets of ceil(frac * n) images, each retrained once with the run's seed.
    protocol "B": K subsets keeping round(alpha * n) images, each retrained with `seeds` seeds
    (run.seed, run.seed + 1, ...) and the BPDs averaged. Either way the prediction is
    BPD(1) - sum over the dropped images of the scores (for B this ranks subsets exactly as the
    literature's sum over the kept images does: the two differ by a constant per query).

    Retrains run on `executor` (engine.executor; default: `jobs` local worker processes); each
    writes its own result file atomically, so any executor may rerun a lost one, and every method
    shares them. callback gets {"stage": "bpd"|"training"|"features", ...} while scores are
    computed, then {"stage": "retrain", "i", "n"} as retrains finish.
    """
    from scipy.stats import pearsonr, spearmanr
    from engine.baselines import METHODS
    if method != "magic" and method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose magic or one of {', '.join(METHODS)}")
    if protocol not in ("A", "B"):
        raise UserError(f"--protocol must be A or B, got {protocol!r}")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    p = run.preset
    queries = [int(q) for q in queries]
    test_x, test_y = data.load_test()
    if any(not 0 <= q < len(test_x) for q in queries):
        raise UserError(f"query indices must be in [0, {len(test_x)})")
    x = test_x[queries]
    if protocol == "A":
        drops = drop_sets(p.n_train, k, frac, seed)
        stamp = {"run_digest": run.digest, "queries": queries, "frac": frac, "seed": seed}
        seeds = 1
    else:
        keep = keep_sets(p.n_train, k, alpha, seed)
        drops = np.stack([np.setdiff1d(np.arange(p.n_train), s) for s in keep])
        stamp = {"run_digest": run.digest, "queries": queries, "protocol": "B", "alpha": alpha, "seed": seed}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cb = callback or (lambda info: None)
    if method == "magic":
        scores, bpd, seconds = _attribution(run, out, queries, x, cb)
    else:
        scores, seconds = _baseline_scores(run, out, method, queries, x, cb)
        bpd = _reference_bpd(run, out, queries, x)
    by_seed = _retrain_bank(run, out, queries, x, protocol, drops, seeds, stamp, executor, jobs, cb)  # (S, Q, K)
    actual = by_seed.mean(0) - bpd[:, None]                                               # (Q, K)
    predicted = -np.stack([scores[:, s].sum(1) for s in drops], axis=1)                   # (Q, K)
    per_query = []
    for i, q in enumerate(queries):
        per_query.append({
            "query": q, "label": int(test_y[q]), "bpd": float(bpd[i]),
            "spearman": float(spearmanr(predicted[i], actual[i])[0]),
            "pearson": float(pearsonr(predicted[i], actual[i])[0]),
            "predicted_change": predicted[i].tolist(), "actual_change": actual[i].tolist()})
    rhos = np.array([r["spearman"] for r in per_query])
    report = {"protocol": protocol, "method": method, "preset": p.name, "run_digest": run.digest, "n_train": p.n_train,
              "drop_sets": len(drops), "drop_size": int(drops.shape[1]), "seed": seed,
              "spearman_mean": float(rhos.mean()), "spearman_std": float(rhos.std()),
              "spearman_min": float(rhos.min()), "score_seconds": seconds, "queries": per_query}
    report |= {"frac": frac} if protocol == "A" else {"alpha": alpha, "seeds": seeds, **seed_breakdown(predicted, by_seed, run.seed)}
    path = report_path(out, method, protocol)
    atomic.save_json(report, path)
    atomic.save_bytes(scatter_png(report), path.with_suffix(".png"))
    if method == "magic" and protocol == "A":
        for r in per_query:
            atomic.save_bytes(scatter_png(report, [r]), out / "scatter" / f"test_{r['query']:05d}.png")
    return report


def seed_breakdown(predicted: np.ndarray, by_seed: np.ndarray, run_seed: int) -> dict:
    """Protocol B against each retraining seed on its own, and how well the seeds agree.

    The metagradient is the derivative of one training run (the run's seed: its initialization,
    batches and noise); a retrain with another seed is another run. So the Spearman against the
    run's own seed and against the others say different things. The agreement between seeds
    (Spearman of one seed's actual changes against another's, per query) is r: if every seed's
    change is a shared effect of the subset plus the seed's own noise, even an exact prediction
    of the shared effect correlates with any one seed at only about sqrt(r).

    Args: predicted (Q, K); by_seed (S, Q, K) retrained BPDs; run_seed the run's seed (= seed 0).
    Returns: {"spearman_by_seed": [{"seed", "mean", "min"}] (S), "seed_agreement": mean over
    queries and seed pairs, or None with one seed}.
    """
    from scipy.stats import spearmanr
    rows = []
    for s, bpd_s in enumerate(by_seed):
        rho = np.array([spearmanr(predicted[i], bpd_s[i])[0] for i in range(len(predicted))])
        rows.append({"seed": run_seed + s, "mean": float(rho.mean()), "min": float(rho.min())})
    pairs = [(a, b) for a in range(len(by_seed)) for b in range(a + 1, len(by_seed))]
    agree = [spearmanr(by_seed[a][i], by_seed[b][i])[0] for a, b in pairs for i in range(by_seed.shape[1])]
    return {"spearman_by_seed": rows, "seed_agreement": float(np.mean(agree)) if agree else None}


def scatter_png(report: dict, qs: Optional[list[dict]] = None) -> bytes:
    """One scatter panel per query (all of the report's by default): predicted vs actual BPD
    change, with its Spearman rho."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    qs = report["queries"] if qs is None else qs
    cols = min(4, len(qs))
    rows = (len(qs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(qs):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, qs):
        a, b = np.array(r["predicted_change"]), np.array(r["actual_change"])
        ax.scatter(a, b, s=10, alpha=0.7)
        lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
        if report.get("method", "magic") == "magic":  # y = x only where the units agree
            ax.plot([lo, hi], [lo, hi], lw=0.8, color="gray", ls="--")
        ax.set_title(f"test {r['query']} (digit {r['label']})  ρ={r['spearman']:.3f}", fontsize=9)
        # a baseline's sums are in its own units (only their ranks are comparable)
        ax.set_xlabel("predicted Δ bits/dim" if report.get("method", "magic") == "magic" else
                      "predicted Δ (score units)", fontsize=8)
        ax.set_ylabel("actual Δ bits/dim", fontsize=8)
        ax.tick_params(labelsize=7)
    what = (f"{report['drop_sets']} drop-sets of {report['drop_size']} images" if report["protocol"] == "A" else
            f"{report['drop_sets']} subsets of {report['n_train'] - report['drop_size']} images, "
            f"{report['seeds']} seeds each")
    fig.suptitle(f"{report.get('method', 'magic')}, LDS protocol {report['protocol']} on `{report['preset']}`: "
                 f"{what}; mean ρ = {report['spearman_mean']:.3f}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
