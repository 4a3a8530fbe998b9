"""Plots of the LDS: predicted against actual BPD change per query, and the comparison's bars."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np


def png_bytes(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure laid out, as PNG bytes (for atomic.save_bytes), and closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def scatter_png(report: dict, qs: Optional[list[dict]] = None, note: Optional[str] = None) -> bytes:
    """One scatter panel per query (all of the report's by default): predicted vs actual BPD
    change, with its Spearman rho; `note` (e.g. who drew the plot again) under the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
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
        if report.get("units") == "bits/dim":  # y = x only where the units agree
            ax.plot([lo, hi], [lo, hi], lw=0.8, color="gray", ls="--")
        ax.set_title(f"test {r['query']} (digit {r['label']})  ρ={r['spearman']:.3f}", fontsize=9)
        # a baseline's sums are in its own units (only their ranks are comparable)
        ax.set_xlabel("predicted Δ bits/dim" if report.get("units") == "bits/dim" else
                      "predicted Δ (score units)", fontsize=8)
        ax.set_ylabel("actual Δ bits/dim", fontsize=8)
        ax.tick_params(labelsize=7)
        # a few ticks an axis: a panel 3 inches wide has no room for more labels like -0.0025
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(5))
    what = (f"{report['drop_sets']} drop-sets of {report['drop_size']} images" if report["protocol"] == "A" else
            f"{report['drop_sets']} subsets of {report['n_train'] - report['drop_size']} images, "
            f"{report['seeds']} seeds each")
    title = (f"{report['method']}, LDS protocol {report['protocol']} on `{report['preset']}`: "
             f"{what}; mean ρ = {report['spearman_mean']:.3f}")
    if note is not None:  # wrapped to the figure's width (about 13 characters an inch at this size)
        import textwrap
        title += "\n" + textwrap.fill(note, int(3.2 * cols * 13))
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def chart_png(report: dict) -> bytes:
    """Bars of mean Spearman per method, protocols side by side, with per-query dots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2, 3.6))
    for j, (protocol, color) in enumerate((("A", "#4c72b0"), ("B", "#dd8452"))):
        for i, m in enumerate(methods):
            r = next((r for r in rows if r["method"] == m and r["protocol"] == protocol), None)
            if r is None:
                continue
            xpos = i + (j - 0.5) * 0.38
            ax.bar(xpos, r["spearman_mean"], width=0.36, color=color, label=f"protocol {protocol}" if i == 0 else None)
            ax.scatter(np.full(len(r["per_query"]), xpos), r["per_query"], s=8, color="black", zorder=3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("Spearman ρ (LDS)")
    ax.set_ylim(-1, 1)
    ax.set_title(f"Predicted vs actual BPD change on `{report['preset']}` ({len(report['queries'])} queries)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    return png_bytes(fig)
