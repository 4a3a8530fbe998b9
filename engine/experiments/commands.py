"""The CLI's experiment commands: lds, compare, figure2, figure4 (engine.cli parses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine import data
from engine.commands import _check_executor_args, _default_jobs, _progress
from engine.errors import UserError


def _lds_queries(a) -> list[int]:
    if a.query_index:
        try:
            return [int(v) for v in a.query_index.split(",")]
        except ValueError:
            raise UserError(f"--query-index must be comma-separated integers, got {a.query_index!r}") from None
    if a.queries < 1:
        raise UserError("--queries must be at least 1")
    return data.query_indices(a.queries, a.seed)


def _methods(spec: str) -> list[str]:
    from engine import methods
    known = methods.names()
    names = known if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise UserError(f"--method: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(known)} or all")
    return names


def _lds_callback(a):
    """Progress bars for run_lds's stages; returns (callback, close)."""
    bars: dict = {}

    def cb(info: dict) -> None:
        stage = info.get("stage", "")
        if stage not in bars:
            for b in bars.values():
                b[0].close()
            total = info.get("n") if stage in ("retrain", "features") else None
            bars[stage] = _progress(total, {"retrain": "retrains", "training": "metagradient",
                                            "features": "TRAK features"}.get(stage, "bits/dim"), a.json)
        bar = bars[stage][0]
        if stage in ("retrain", "features"):
            bar.n = info["i"]
            bar.refresh()
        else:
            bar.update(1)

    def close() -> None:
        for b in bars.values():
            b[0].close()
        bars.clear()
    return cb, close


def _setup(a):
    """What lds and compare share: (run, queries, method names, executor, callback, close)."""
    from engine.executor import make_executor
    from engine.store import load_run
    # checked before anything is computed or written
    for flag, value in (("--drop-sets", a.drop_sets), ("--subsets", getattr(a, "subsets", None))):
        if value is not None and value < 2:
            raise UserError(f"{flag} must be at least 2 (LDS ranks the predictions across them), got {value}")
    if a.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {a.seeds}")
    if a.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {a.seed}")
    run = load_run(a.run)
    queries = _lds_queries(a)
    methods = _methods(a.method)
    _default_jobs(a, run)
    _check_executor_args(a)
    return (run, queries, methods, make_executor(a.executor, jobs=a.jobs, address=a.address), *_lds_callback(a))


def cmd_lds(a) -> dict:
    from engine.experiments.lds import run_lds
    run, queries, methods, executor, cb, close = _setup(a)
    k = a.drop_sets or (50 if a.protocol == "A" else 16)
    reports = []
    for m in methods:
        reports.append(run_lds(run, Path(a.out), queries, method=m, protocol=a.protocol, k=k, frac=a.frac,
                               alpha=a.alpha, seeds=a.seeds, seed=a.seed, executor=executor, callback=cb))
        close()
    return {"out": a.out, "reports": [{k: v for k, v in r.items() if k != "queries"} | {
        "per_query": [{k: q[k] for k in ("query", "label", "bpd", "spearman", "pearson")} for q in r["queries"]]}
        for r in reports]}


def cmd_compare(a) -> dict:
    from engine.experiments import comparison
    run, queries, methods, executor, cb, close = _setup(a)
    protocols = [p.strip() for p in a.protocols.split(",") if p.strip()]
    if not protocols or any(p not in ("A", "B") for p in protocols):
        raise UserError(f"--protocols must be A, B or A,B, got {a.protocols!r}")
    table = comparison.run_comparison(run, Path(a.out), Path(a.report), queries, methods=methods, protocols=protocols,
                                   k_a=a.drop_sets, k_b=a.subsets, seeds=a.seeds, seed=a.seed,
                                   executor=executor, callback=cb)
    close()
    return {"report": a.report, "table": table}


def cmd_figure4(a) -> dict:
    from engine.experiments import figure4
    from engine.store import load_run
    run = load_run(a.run)
    if not 1 <= a.k <= run.preset.n_train:
        raise UserError(f"--k must be between 1 and {run.preset.n_train} (the training images), got {a.k}")
    try:
        with np.load(a.scores, allow_pickle=False) as f:
            grad_w = f["grad_w"] if "grad_w" in f.files else f["scores"]
            if "queries" in f:
                queries = [int(q) for q in f["queries"]]
            else:
                specs = [str(s) for s in f["inputs"]]
                if not all(s.startswith("test:") for s in specs):
                    raise UserError(f"{a.scores}: figure4 needs test-set queries (inputs written as test:I)")
                queries = [int(s[5:]) for s in specs]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{a.scores}: not a scores file of `attribute` or `lds` ({type(e).__name__})") from None
    if grad_w.shape != (len(queries), run.preset.n_train):
        raise UserError(f"{a.scores}: grad_w has shape {grad_w.shape}, expected ({len(queries)}, {run.preset.n_train}) for this run")
    rep = figure4.run_figure4(run, grad_w, queries, Path(a.out), k=a.k)
    return {"out": a.out, "findings": rep["findings"]}


def cmd_figure2(a) -> dict:
    from engine.experiments import figure2
    from engine.store import load_run
    run = load_run(a.run)
    bar, cb = _progress(4 * a.n, "figure2 images", a.json)
    report = figure2.run_figure2(run, Path(a.out), n=a.n, angle=a.angle, k_avg=a.k_avg, seed=a.seed,
                                     images=a.images, callback=cb)
    bar.close()
    return report
