"""Linear datamodeling score, protocol A: do MAGIC's predictions rank actual retrainings?

K random drop-sets, each a fraction `frac` of the training set, are removed in turn and the
model retrained with the run's seed (same batches, same noise: only the dropped examples'
weights change). For every query the actual change BPD_S - BPD is compared with the predicted
change -sum_{i in S} grad_w[i] by Spearman's rank correlation.

The folder `out` makes the protocol resumable: attribution.npz (grad_w, bpd, queries),
retrains/set_XXX.json (one per finished retrain, never redone), then lds.json and the scatter
plots. Retrains run in `jobs` worker processes that split the machine's cores.
"""

from __future__ import annotations

import io
import math
import json
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


def _attribution(run: Run, out: Path, queries: list[int], x: torch.Tensor, callback) -> tuple[np.ndarray, np.ndarray]:
    """grad_w (Q, n) and BPD (Q,) from out/attribution.npz if it matches this run and these queries."""
    from engine.attribution import attribute
    path = out / "attribution.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["run_digest"]) == run.digest and f["queries"].tolist() == queries:
                    return f["grad_w"], f["bpd"]
        except Exception:
            pass  # unreadable or from another run: recompute
    grad_w, bpd = attribute(run, x, callback=callback)
    atomic.save_npz(path, grad_w=grad_w, bpd=bpd, queries=np.array(queries), run_digest=np.array(run.digest))
    return grad_w, bpd


def run_lds(run: Run, out: Path, queries: Sequence[int], *, k: int = 50, frac: float = 0.01, seed: int = 0,
            jobs: int = 1, executor=None, callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Protocol A for test-set `queries` (Q indices) on a finished run; writes `out` (see above).

    Retrains run on `executor` (engine.executor; default: `jobs` local worker processes). Each
    writes its own result file atomically, so any executor may rerun a lost one.

    callback gets {"stage": "bpd"|"training", ...} during attribution, then {"stage": "retrain",
    "i", "n"} as retrains finish. Returns the report written to out/lds.json.
    """
    from scipy.stats import pearsonr, spearmanr
    p = run.preset
    queries = [int(q) for q in queries]
    test_x, test_y = data.load_test()
    if any(not 0 <= q < len(test_x) for q in queries):
        raise UserError(f"query indices must be in [0, {len(test_x)})")
    x = test_x[queries]
    sets = drop_sets(p.n_train, k, frac, seed)
    out = Path(out)
    (out / "retrains").mkdir(parents=True, exist_ok=True)
    cb = callback or (lambda info: None)
    grad_w, bpd = _attribution(run, out, queries, x, lambda i: cb(i))

    def result_path(j: int) -> Path:
        return out / "retrains" / f"set_{j:03d}.json"

    def load_result(j: int) -> Optional[np.ndarray]:
        try:
            r = json.loads(result_path(j).read_text())
            if r["drop"] == sets[j].tolist() and len(r["bpd"]) == len(queries):
                return np.array(r["bpd"])
        except (OSError, ValueError, KeyError):
            pass
        return None

    # a result is tied to its drop-set and query count; the folder is tied to the run and queries
    stamp = {"run_digest": run.digest, "queries": queries, "frac": frac, "seed": seed}
    stamp_path = out / "retrains" / "stamp.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) != stamp:
        for f in (out / "retrains").glob("set_*.json"):
            f.unlink()
    atomic.save_json(stamp, stamp_path)
    todo = [j for j in range(k) if load_result(j) is None]
    done = k - len(todo)
    cb({"stage": "retrain", "i": done, "n": k})
    if todo:
        from engine.executor import LocalExecutor
        ex = executor or LocalExecutor(jobs)
        for _ in ex.run(_retrain_job, [(p.to_dict(), run.seed, sets[j], x.numpy(), str(result_path(j))) for j in todo]):
            done += 1
            cb({"stage": "retrain", "i": done, "n": k})
    actual = np.stack([load_result(j) for j in range(k)], axis=1) - bpd[:, None]      # (Q, K)
    predicted = -np.stack([grad_w[:, s].sum(1) for s in sets], axis=1)                  # (Q, K)
    per_query = []
    for i, q in enumerate(queries):
        per_query.append({
            "query": q, "label": int(test_y[q]), "bpd": float(bpd[i]),
            "spearman": float(spearmanr(predicted[i], actual[i])[0]),
            "pearson": float(pearsonr(predicted[i], actual[i])[0]),
            "predicted_change": predicted[i].tolist(), "actual_change": actual[i].tolist()})
    rhos = np.array([r["spearman"] for r in per_query])
    report = {"protocol": "A", "preset": p.name, "run_digest": run.digest, "n_train": p.n_train,
              "drop_sets": k, "drop_size": int(sets.shape[1]), "frac": frac, "seed": seed,
              "spearman_mean": float(rhos.mean()), "spearman_min": float(rhos.min()),
              "queries": per_query}
    atomic.save_json(report, out / "lds.json")
    atomic.save_bytes(scatter_png(report), out / "lds.png")
    for r in per_query:
        atomic.save_bytes(scatter_png(report, [r]), out / "scatter" / f"test_{r['query']:05d}.png")
    return report


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
        ax.plot([lo, hi], [lo, hi], lw=0.8, color="gray", ls="--")
        ax.set_title(f"test {r['query']} (digit {r['label']})  ρ={r['spearman']:.3f}", fontsize=9)
        ax.set_xlabel("predicted Δ bits/dim", fontsize=8)
        ax.set_ylabel("actual Δ bits/dim", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"LDS protocol A on `{report['preset']}`: {report['drop_sets']} drop-sets of "
                 f"{report['drop_size']} images; mean ρ = {report['spearman_mean']:.3f}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
