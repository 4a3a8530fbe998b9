"""The comparison table: LDS of MAGIC and every baseline, protocols A and B, on one run.

Every (method, protocol) goes through engine.experiments.lds.run_lds on the same folder, so all methods
share the same queries, drop-sets and retrained models (each retrain is computed once).
Writes <stem>.json (everything), <stem>.md (the table, with the published values beside ours)
and <stem>.png (mean Spearman per method and protocol, with each query's value as a dot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from engine import atomic, presets, provenance
from engine.experiments import plots
from engine.store import Run

# Published values, for context only: other data, models and protocols than ours.
LITERATURE = [
    ("seed write-up (MNIST, 4 test images, 1% drop, one seed)", "MAGIC", "≈ 0.9 (Spearman, typical)"),
    ("seed write-up (same setting)", "TRAK", "≤ 0.3 (Spearman, typical)"),
    ("D-TRAK paper, Zheng et al. 2023 (CIFAR-2, alpha = 0.5 subsets, several seeds)", "D-TRAK", "≈ 0.34 (LDS)"),
]


def run_comparison(run: Run, out: Path, stem: Path, queries: Sequence[int], *, methods: Sequence[str],
                   protocols: Sequence[str] = ("A", "B"), k_a: int = 50, k_b: int = 16, seeds: int = 2,
                   seed: int = 0, executor=None, callback: Optional[Callable[[dict], None]] = None) -> str:
    """Runs (or resumes) every method on the protocols and writes the comparison; returns the
    Markdown table."""
    from engine.experiments.lds import run_lds
    rows = []
    for protocol, k in (("A", k_a), ("B", k_b)):
        if protocol not in protocols:
            continue
        for m in methods:
            r = run_lds(run, out, queries, method=m, protocol=protocol, k=k, seeds=seeds, seed=seed,
                        executor=executor, callback=callback)
            rows.append({key: v for key, v in r.items() if key != "queries"} |
                        {"per_query": [q["spearman"] for q in r["queries"]], "queries_list": [q["query"] for q in r["queries"]]})
    report = {**provenance.stamp(), "preset": run.preset.name, "preset_label": presets.label(run.preset), "run_digest": run.digest, "queries": [int(q) for q in queries],
              "rows": rows, "literature": [dict(zip(("source", "method", "value"), x)) for x in LITERATURE]}
    md = markdown(report)
    # the stem may hold dots (results/comparison_lr2.5e-4): add to it, never replace a "suffix"
    stem = Path(stem)
    at = lambda ext: stem.with_name(stem.name + ext)  # noqa: E731
    atomic.save_json(report, at(".json"))
    atomic.save_bytes(md.encode(), at(".md"))
    atomic.save_bytes(plots.chart_png(report), at(".png"))
    return md


def markdown(report: dict) -> str:
    from engine import methods
    descriptions = {m.name: m.description for m in methods.all()}
    rows = report["rows"]
    by = {(r["method"], r["protocol"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    a0 = next((r for r in rows if r["protocol"] == "A"), None)
    b0 = next((r for r in rows if r["protocol"] == "B"), None)
    lines = [f"# LDS comparison on {report.get('preset_label', '`' + report['preset'] + '`')} ({rows[0]['n_train']} training images, "
             f"{len(report['queries'])} test queries)", ""]
    if a0:
        lines.append(f"- Protocol A: {a0['drop_sets']} random drop-sets of {a0['drop_size']} images (1%), each retrained "
                     "once with the run's seed; Spearman between predicted and actual BPD change, per query.")
    if b0:
        lines.append(f"- Protocol B: {b0['drop_sets']} random subsets keeping {b0['n_train'] - b0['drop_size']} images "
                     f"(alpha = {b0['alpha']}), each retrained with {b0['seeds']} seeds and the BPDs averaged.")
    lines += ["- Spearman per query, then mean ± standard deviation over queries (min in brackets).",
              "- Cost: seconds to score all queries on 2 CPU cores (wall clock), retraining excluded.", "",
              "| method | protocol A | protocol B | cost (s) | what it is |", "|---|---|---|---|---|"]

    def cell(r):
        return "not run" if r is None else f"{r['spearman_mean']:.3f} ± {r['spearman_std']:.3f} ({r['spearman_min']:.3f})"
    for m in methods:
        a, b = by.get((m, "A")), by.get((m, "B"))
        sec = (a or b)["score_seconds"]
        lines.append(f"| {m} | {cell(a)} | {cell(b)} | {'not recorded' if sec is None else f'{sec:.0f}'} | "
                     f"{descriptions.get(m, '')} |")
    seeded = [(m, by[(m, "B")]) for m in methods if "spearman_by_seed" in by.get((m, "B"), {})]
    if seeded:
        n_seeds = len(seeded[0][1]["spearman_by_seed"])
        lines += ["", "Protocol B against each retraining seed alone (mean Spearman over queries). The first is the "
                  "run's own seed: the same initialization, batches and noise as the model that was attributed; "
                  "the others are different training runs.", "",
                  "| method | " + " | ".join(f"seed {r['seed']}" + (" (the run's)" if i == 0 else "")
                                           for i, r in enumerate(seeded[0][1]["spearman_by_seed"])) + " |",
                  "|---|" + "---|" * n_seeds]
        lines += [f"| {m} | " + " | ".join(f"{r['mean']:.3f}" for r in b["spearman_by_seed"]) + " |" for m, b in seeded]
        agree = seeded[0][1].get("seed_agreement")
        if agree is not None:
            lines += ["", f"Agreement between seeds: the actual BPD changes of one seed against another's, Spearman "
                      f"{agree:.3f} (mean over queries and seed pairs). If each seed's change is an effect of the "
                      "subset shared by all seeds plus the seed's own noise, even an exact prediction of the shared "
                      f"effect correlates with any one seed at only about sqrt({agree:.3f}) = "
                      f"{np.sqrt(max(agree, 0.0)):.2f}."]
    lines += ["", "Published values (other data, models or protocols; for orientation, not a like-for-like test):", "",
              "| source | method | value |", "|---|---|---|"]
    lines += [f"| {x['source']} | {x['method']} | {x['value']} |" for x in report["literature"]]
    return "\n".join(lines) + "\n"
