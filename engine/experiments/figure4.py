"""The seed's Figure 4 findings, measured: who are the strongest proponents and opponents?

From MAGIC scores grad_w (Q, n) of Q test queries on one run, with k = 16:
- galleries: each query's top-k proponents (most negative grad_w: removing them raises its BPD)
  and opponents (most positive), with labels and scores (figure4.png);
- class histograms of those galleries against the training set's class shares (figure4_classes.png);
- similarity: how often a gallery image has the query's label, and the pixel cosine similarity of
  gallery images to the query against that of the average training image;
- recurrence: how many distinct training images fill the Q x k gallery slots, against the number
  expected if every query drew its k images at random;
- digit 1: its share of each query's opponents and its mean score per class.
Everything lands in `out`: figure4.json, figure4.md and the two PNGs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from engine import atomic, data, presets, provenance
from engine.attribution import top_k
from engine.store import Run


def analyse(grad_w: np.ndarray, queries: Sequence[int], train_x: np.ndarray, train_y: np.ndarray,
            test_x: np.ndarray, test_y: np.ndarray, k: int = 16) -> dict:
    """The findings as a dict (pure: no files). grad_w (Q, n); *_x (N, 784) in [0,1]; *_y (N,)."""
    n = grad_w.shape[0 if grad_w.ndim == 1 else 1]
    q_count = len(queries)
    base = np.bincount(train_y, minlength=10) / len(train_y)
    unit = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    per_query, slots = [], {"proponents": [], "opponents": []}
    for i, q in enumerate(queries):
        tk = top_k(grad_w[i], k)
        qv = test_x[q] / max(np.linalg.norm(test_x[q]), 1e-12)
        cos_all = unit @ qv
        r = {"query": int(q), "label": int(test_y[q]), "mean_cosine_all": float(cos_all.mean()),
             "class_mean_score": [float(grad_w[i, train_y == c].mean()) for c in range(10)]}
        for kind, idx in tk.items():
            slots[kind].append(idx)
            labels = train_y[idx]
            r[kind] = [{"index": int(j), "label": int(train_y[j]), "grad_w": float(grad_w[i, j])} for j in idx]
            r[f"{kind}_classes"] = np.bincount(labels, minlength=10).tolist()
            r[f"{kind}_same_label"] = float((labels == test_y[q]).mean())
            r[f"{kind}_mean_cosine"] = float(cos_all[idx].mean())
            r[f"{kind}_ones"] = float((labels == 1).mean())
        per_query.append(r)
    expected_distinct = n * (1 - (1 - k / n) ** q_count)
    recurrence = {}
    for kind, lists in slots.items():
        counts = np.bincount(np.concatenate(lists), minlength=n)
        top = np.argsort(-counts, kind="stable")[:8]
        recurrence[kind] = {
            "distinct": int((counts > 0).sum()), "slots": q_count * k, "expected_distinct_if_random": float(expected_distinct),
            "in_half_or_more_queries": int((counts >= q_count / 2).sum()),
            "most_recurrent": [{"index": int(j), "label": int(train_y[j]), "queries": int(counts[j])} for j in top if counts[j] > 1]}
    ones_opp = np.array([r["opponents_ones"] for r in per_query])
    class_scores = np.array([r["class_mean_score"] for r in per_query])  # (Q, 10)
    most_opposing = class_scores.argmax(1)
    findings = {
        "dissimilar": {
            "same_label_proponents": float(np.mean([r["proponents_same_label"] for r in per_query])),
            "same_label_opponents": float(np.mean([r["opponents_same_label"] for r in per_query])),
            "same_label_base_rate": float(np.mean([base[r["label"]] for r in per_query])),
            "cosine_proponents": float(np.mean([r["proponents_mean_cosine"] for r in per_query])),
            "cosine_opponents": float(np.mean([r["opponents_mean_cosine"] for r in per_query])),
            "cosine_all": float(np.mean([r["mean_cosine_all"] for r in per_query]))},
        "digit1": {
            "ones_share_opponents": float(ones_opp.mean()), "ones_share_proponents":
                float(np.mean([r["proponents_ones"] for r in per_query])),
            "ones_base_rate": float(base[1]),
            "queries_where_1_is_the_commonest_opponent_class": int(sum(np.argmax(r["opponents_classes"]) == 1 for r in per_query)),
            "queries_where_1_has_the_highest_mean_score": int((most_opposing == 1).sum()),
            "most_opposing_class_per_query": most_opposing.tolist()},
        "recurrence": recurrence,
    }
    return {"k": k, "n_train": int(n), "train_class_shares": base.tolist(), "findings": findings, "queries": per_query}


def _markdown(rep: dict, preset: str) -> str:
    f, k, q = rep["findings"], rep["k"], len(rep["queries"])
    d, o = f["dissimilar"], f["digit1"]
    lines = [f"# Figure 4 findings on {preset} ({q} test queries, top {k}, n = {rep['n_train']})", "",
             "| seed's claim | measured here |", "|---|---|",
             f"| the top influential images do not look like the query | same label: proponents {d['same_label_proponents']:.2f}, "
             f"opponents {d['same_label_opponents']:.2f}, base rate {d['same_label_base_rate']:.2f}; pixel cosine to the query: "
             f"proponents {d['cosine_proponents']:.3f}, opponents {d['cosine_opponents']:.3f}, all training images {d['cosine_all']:.3f} |"]
    for kind in ("proponents", "opponents"):
        r = f["recurrence"][kind]
        lines.append(f"| the same images recur across queries ({kind}) | {r['distinct']} distinct images in {r['slots']} slots "
                     f"(random draws: {r['expected_distinct_if_random']:.0f}); {r['in_half_or_more_queries']} in at least half of the queries |")
    lines.append(f"| digit 1 is the most negative influence for every query | share of 1s among opponents {o['ones_share_opponents']:.2f} "
                 f"(proponents {o['ones_share_proponents']:.2f}, training base rate {o['ones_base_rate']:.2f}); 1 is the commonest "
                 f"opponent class for {o['queries_where_1_is_the_commonest_opponent_class']}/{q} queries and has the highest mean "
                 f"score for {o['queries_where_1_has_the_highest_mean_score']}/{q} |")
    return "\n".join(lines) + "\n"


def _galleries_png(rep: dict, train_x: np.ndarray, test_x: np.ndarray) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    qs, k = rep["queries"], rep["k"]
    fig, axes = plt.subplots(len(qs), 2 * k + 2, figsize=(0.55 * (2 * k + 2), 0.75 * len(qs)), squeeze=False)
    for row, r in zip(axes, qs):
        for ax in row:
            ax.axis("off")
        row[0].imshow(test_x[r["query"]].reshape(28, 28), cmap="gray", vmin=0, vmax=1)
        row[0].set_title(f"test {r['query']}", fontsize=5)
        for j, e in enumerate(r["proponents"]):
            row[2 + j].imshow(train_x[e["index"]].reshape(28, 28), cmap="Greens_r", vmin=0, vmax=1)
            row[2 + j].set_title(str(e["label"]), fontsize=5)
        for j, e in enumerate(r["opponents"]):
            row[2 + k + j].imshow(train_x[e["index"]].reshape(28, 28), cmap="Reds_r", vmin=0, vmax=1)
            row[2 + k + j].set_title(str(e["label"]), fontsize=5)
    fig.suptitle(f"query | top-{k} proponents (green: removing raises its BPD) | top-{k} opponents (red)", fontsize=8)
    return _png(fig)


def _classes_png(rep: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    base = np.array(rep["train_class_shares"]) * rep["k"] * len(rep["queries"])
    for ax, kind in zip(axes, ("proponents", "opponents")):
        tot = np.sum([r[f"{kind}_classes"] for r in rep["queries"]], axis=0)
        ax.bar(range(10), tot, color="tab:green" if kind == "proponents" else "tab:red", alpha=0.8, label=f"top-{rep['k']} {kind}")
        ax.step(np.arange(10), base, where="mid", color="black", lw=1, label="expected at the training shares")
        ax.set_xticks(range(10))
        ax.set_xlabel("digit")
        ax.set_title(f"classes of the {kind}, all queries", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    return buf.getvalue()


def run_figure4(run: Run, grad_w: np.ndarray, queries: Sequence[int], out: Path, k: int = 16) -> dict:
    """Analyse, then write figure4.json/.md/.png and figure4_classes.png into `out`."""
    tx, ty = data.load_train(run.preset.n_train, run.preset.source)
    sx, sy = data.load_test()
    train_x, test_x = tx.reshape(len(tx), -1).numpy().astype(np.float64), sx.reshape(len(sx), -1).numpy().astype(np.float64)
    rep = analyse(np.asarray(grad_w, np.float64), list(queries), train_x, ty.numpy(), test_x, sy.numpy(), k)
    rep["preset"], rep["run_digest"] = run.preset.name, run.digest
    rep["preset_label"] = presets.label(run.preset)
    rep.update(provenance.stamp())
    out = Path(out)
    atomic.save_json(rep, out / "figure4.json")
    atomic.save_text(_markdown(rep, rep["preset_label"]), out / "figure4.md")
    atomic.save_bytes(_galleries_png(rep, train_x, test_x), out / "figure4.png")
    atomic.save_bytes(_classes_png(rep), out / "figure4_classes.png")
    return rep
