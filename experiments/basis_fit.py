"""How should a query basis fit a new query, and what limits it? A study on one run's stored basis,
with no replay of training.

    python experiments/basis_fit.py --run runs/cpu --rep basis64 --bank results/lds_cpu_positional_x10 \
        --exact-from results/lds_cpu_positional_x10/scores/magic.npz --out results/basis_fit_cpu

A query basis (engine.precompute.basis) writes a query gradient g in its K images' gradients
G (K, P) by ridge least squares, c = (G G^T + lam I)^-1 G g, lam = rel * trace(G G^T) / K, and
predicts grad_w ~ A c, A = J^T G^T (n, K) its images' exact attributions. Small rel fits g as
closely as the basis allows; large rel shrinks c toward G g / lam, a mix of the images' exact
attributions weighted by the inner products of their gradients with g (a kernel rule). Swept:
- rel over eight decades, on the rows as computed ("raw") and on rows scaled to unit norm
  ("normalized": noise and rotated images have far larger gradients than digits, so raw inner
  products weigh them most; A's columns scale with them);
- for each, leave-one-out on the basis itself: every basis image's exact attribution A[:, k]
  predicted from the other K-1 (all from the Gram matrix), Spearman with A[:, k]: what a rule
  choosing rel at precompute time, without exact answers for other images, could use.
Reference rows, at the shipped rel: the query-agnostic mean of the basis's plain-digit columns
(what the basis adds to it); the plain-digit columns alone; and the basis grown by the exact
replays of the other queries (what the app would gain by adding each exact replay it makes to
the basis); and the ceiling of any fit in this basis, its columns combined by least squares on
the exact answer itself (which a fit never has). Per query, the share of |g| the basis leaves unfitted, |g - G^T c| / |g|; over all queries, where
the unfitted part lies, by parameter group (the first part of a parameter's name), beside where g
lies; and, if the net has positional maps ("pos.*", per-pixel parameters whose gradient follows an
image's own strokes), the fit with their part of every gradient weighted down or up (c minimizing
sum_i w_i (g - G^T c)_i^2, w_i = w on their entries and 1 elsewhere, w below and above 1); and the fit
in a diagonal metric from the basis (w_i = 1 / the rms of entry i over the basis rows).

Measured on the fidelity study's queries (experiments/precompute_fidelity.py: 8 test digits,
its drawn digits (8; 4 before 2, 3, 6 and 9 were added), 4 off-distribution; exact grad_w from
the bank's MAGIC scores for the test digits and RUN/fidelity/exact*.npz, which that study wrote,
for the others): Spearman with exact MAGIC, top-16
proponents shared, and LDS protocol A against the bank's committed retrains (on all of them: the
fidelity study's --lds-images added the drawn and off-distribution images to the bank).
Writes fit.json, fit.md and fit.png under --out, with the command and commit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, provenance  # noqa: E402
from engine.precompute.basis import RIDGE_REL, regularized  # noqa: E402
from engine.store import load_run  # noqa: E402

RELS = (1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 10.0, 1e3)
POS_WEIGHTS = (10.0, 3.0, 0.3, 0.1, 0.0)


def group_masks(run, p: int, by_map: bool = False) -> dict[str, np.ndarray]:
    """For each parameter group (the first part of a parameter's name: "enc", "pos", ...), in the
    parameters' order, the (P,) bool mask of its entries in a flat parameter vector; with `by_map`,
    each positional map its own group, named by its size ("pos 28x28", ...: a map's index is not
    its level when the finer levels have none)."""
    params = run.load_final().model_params
    sizes = [int(np.prod(t.shape)) for t in params.values()]
    if sum(sizes) != p:
        raise ValueError(f"the gradients have {p} entries, the run's parameters {sum(sizes)}")
    names = [f"pos {t.shape[-2]}x{t.shape[-1]}" if by_map and n.startswith("pos.") else n.split(".")[0]
             for n, t in params.items()]
    owner = np.repeat(names, sizes)
    return {group: owner == group for group in dict.fromkeys(names)}


def fit(gram: np.ndarray, gq: np.ndarray, rel: float = RIDGE_REL) -> np.ndarray:
    """Ridge coefficients c (Q, K) of query gradients, given their inner products gq = g G^T (Q, K)
    with the basis rows and the rows' Gram matrix G G^T (K, K): as engine.precompute.basis.ridge_inverse."""
    return np.linalg.solve(regularized(gram, rel), gq.T).T


def leave_one_out(gram: np.ndarray, a: np.ndarray, rel: float = RIDGE_REL) -> np.ndarray:
    """Spearman (K,) of each basis image's exact attribution A[:, k] (A (n, K)) with its prediction
    from the other K-1 images' gradients (Gram matrix (K, K)) and attributions."""
    from scipy.stats import spearmanr
    k = len(gram)
    out = np.zeros(k)
    for j in range(k):
        o = np.r_[0:j, j + 1:k]
        c = fit(gram[np.ix_(o, o)], gram[o, j][None, :], rel)[0]
        out[j] = spearmanr(a[:, o] @ c, a[:, j])[0]
    return out


def ceiling(a: np.ndarray, gw: np.ndarray) -> np.ndarray:
    """(Q, n): each exact attribution gw[q] (gw (Q, n)) projected on the span of the basis's exact
    attributions A (n, K): the closest any prediction A c can come to it, whatever c a fit picks."""
    return (a @ np.linalg.lstsq(a, gw.T, rcond=None)[0]).T


def main() -> None:
    from engine.errors import UserError
    from engine.precompute import representation as R
    from engine.precompute import shipped
    from engine.precompute.basis import digit_columns
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/cpu")
    ap.add_argument("--rep", default="basis64")
    ap.add_argument("--bank", default="results/lds_cpu_positional_x10")
    ap.add_argument("--exact-from", default="results/lds_cpu_positional_x10/scores/magic.npz")
    ap.add_argument("--out", default="results/basis_fit_cpu")
    ap.add_argument("--jobs", type=int, default=2, help="retrains in parallel, for queries the bank lacks")
    a = ap.parse_args()
    # the fidelity study's queries, exact scores, overlap and LDS: the two reports measure the same things
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import precompute_fidelity as F
    from scipy.stats import spearmanr
    provenance.start()
    try:
        run = load_run(a.run)
        shipped.install(run)  # the basis as the app uses it
        rep = R.load(run, a.rep)
        if rep.method != "basis":
            raise UserError(f"{a.rep} is a {rep.method} representation, not a query basis")
        q = F.queries(8)
        names = list(q)
        x = torch.stack([q[k] for k in names])
        reused = F.reused_exact(run, names, x, Path(a.exact_from))
        if len(reused["index"]) != 8:
            raise UserError(f"--exact-from {a.exact_from}: holds {len(reused['index'])} of the 8 test queries")
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    rest = [i for i in range(len(names)) if i not in reused["index"]]
    part = F.exact(run, [names[i] for i in rest], x[rest], run.path / "fidelity")  # the study's file, else a replay
    gw = np.zeros((len(names), run.preset.n_train))
    bpd = np.zeros(len(names))
    g = np.zeros((len(names), rep.b.shape[1]))
    for idx, p in ((reused["index"], reused), (rest, part)):
        gw[idx], bpd[idx], g[idx] = p["grad_w"], p["bpd"], p["g"]
    kinds = ["test" if n.startswith("test:") else "drawn" if n.startswith("drawn") else "off-distribution" for n in names]
    basis_g = rep.extra["gram"].astype(np.float64) @ rep.b.astype(np.float64)  # G (K, P), as installed
    amat = rep.a.astype(np.float64)
    # LDS on every query: the bank's retrains hold the test digits, and (since the fidelity study's
    # --lds-images) the drawn and off-distribution images, which it retrains for once if it lacks them
    from engine.experiments.bank import image_key
    keys = [int(n[5:]) if k == "test" else image_key(x[i]) for i, (n, k) in enumerate(zip(names, kinds))]
    imgs = {k: x[i].numpy() for i, k in enumerate(keys) if isinstance(k, str)}
    drops, actual = F.actual_changes(run, Path(a.bank), keys, bpd, imgs, a.jobs)

    def row(s: np.ndarray, **what) -> dict:
        ov = [F.overlap(s[i], gw[i]) for i in range(len(names))]
        r = {**what, "spearman_with_exact": [float(spearmanr(s[i], gw[i])[0]) for i in range(len(names))],
             "top_proponents_shared": [o[0] for o in ov], "lds": F.lds_of(s, drops, actual).tolist()}
        print(f"{what['fit']:48s} rel {what.get('rel') or 0:7.0e}: Spearman {np.mean(r['spearman_with_exact']):.3f}, "
              f"LDS {np.mean(r['lds']):.3f}" + (f", leave-one-out {np.mean(what['loo_spearman']):.3f}"
                                                if "loo_spearman" in what else ""), flush=True)
        return r

    rows = []
    norms = np.linalg.norm(basis_g, axis=1)
    for scaling in ("raw", "normalized"):
        d = 1.0 / norms if scaling == "normalized" else np.ones_like(norms)
        gk, ak = basis_g * d[:, None], amat * d[None, :]  # A = J^T G^T scales with G's rows
        gram = gk @ gk.T
        for rel in RELS:
            rows.append(row(fit(gram, g @ gk.T, rel) @ ak.T, fit=f"{scaling} rows", scaling=scaling, rel=rel,
                            loo_spearman=leave_one_out(gram, ak, rel).tolist()))
    digits = digit_columns(rep)
    mean = amat[:, digits].mean(axis=1)
    refs = [row(np.tile(mean, (len(names), 1)), fit=f"query-agnostic: mean of the {len(digits)} digit columns")]
    gd = basis_g[digits]
    refs.append(row(fit(gd @ gd.T, g @ gd.T) @ amat[:, digits].T, fit=f"the {len(digits)} digit columns alone", rel=RIDGE_REL))
    grown = np.zeros_like(gw)
    for i in range(len(names)):  # each query fitted in the basis plus the other queries' exact replays
        o = [j for j in range(len(names)) if j != i]
        gb, ab = np.vstack([basis_g, g[o]]), np.hstack([amat, gw[o].T])
        grown[i] = fit(gb @ gb.T, g[i:i + 1] @ gb.T)[0] @ ab.T
    refs.append(row(grown, fit=f"basis plus the other {len(names) - 1} queries' exact replays", rel=RIDGE_REL))
    # the ceiling of any fit: the combination of the basis's columns closest to the exact answer
    # itself (least squares on grad_w, which a fit never has); how much a better fit could gain
    refs.append(row(ceiling(amat, gw), fit="ceiling: the columns' least-squares fit to the exact answer itself"))
    groups = group_masks(run, basis_g.shape[1])
    pos = groups.get("pos")
    for w in POS_WEIGHTS if pos is not None else ():
        wt = np.where(pos, w, 1.0)
        refs.append(row(fit((basis_g * wt) @ basis_g.T, (g * wt) @ basis_g.T) @ amat.T,
                        fit=f"positional maps weighted {w:g} in the fit", rel=RIDGE_REL))
    # a diagonal metric from the basis itself: every parameter weighted by 1 / its rms over the basis rows,
    # so that parameters the basis images barely move count as much as the ones they move most
    wt = 1.0 / np.sqrt((basis_g ** 2).mean(axis=0) + 1e-30)
    wt /= wt.mean()
    refs.append(row(fit((basis_g * wt) @ basis_g.T, (g * wt) @ basis_g.T) @ amat.T,
                    fit="each parameter weighted by 1 / its rms over the basis", rel=RIDGE_REL))
    c = fit(basis_g @ basis_g.T, g @ basis_g.T)
    residual = g - c @ basis_g
    unfitted = (np.linalg.norm(residual, axis=1) / np.linalg.norm(g, axis=1)).tolist()
    where = {n: {"parameters": int(m.sum()), "share_of_g": float((g[:, m] ** 2).sum() / (g ** 2).sum()),
                 "share_of_unfitted": float((residual[:, m] ** 2).sum() / (residual ** 2).sum())}
             for n, m in groups.items()}
    report = {**provenance.stamp(), "run": str(run.path), "run_digest": run.digest, "rep": a.rep,
              "shipped_rel": RIDGE_REL, "basis_images": rep.info.get("images"), "queries": names, "kinds": kinds,
              "unfitted_share": unfitted, "unfitted_by_group": where, "rows": rows, "references": refs}
    out = Path(a.out)
    atomic.save_json(report, out / "fit.json")
    atomic.save_text(_markdown(report), out / "fit.md")
    atomic.save_bytes(_plot(report), out / "fit.png")
    print(_markdown(report))


def _markdown(r: dict) -> str:
    kinds = np.array(r["kinds"])
    images = np.array([str(n).startswith("test:") for n in r["basis_images"]])
    un = np.array(r["unfitted_share"])

    def cells(row: dict) -> str:
        rho, p, l = (np.array(row[k]) for k in ("spearman_with_exact", "top_proponents_shared", "lds"))
        parts = " / ".join(f"{rho[kinds == k].mean():.3f}" for k in ("test", "drawn", "off-distribution"))
        ldss = " / ".join(f"{l[kinds == k].mean():.3f}" for k in ("test", "drawn", "off-distribution"))
        return f"{parts} ({rho.min():.3f}) | {p.mean():.1f} ({p.min()}) | {ldss} ({l.min():.3f})"
    lines = [f"# Fitting a query in the basis `{r['rep']}` of `{r['run']}`", "",
             f"`{r['command']}` at commit {r['commit']}. Ridge lam = rel * trace(G G^T) / K; the shipped rel is "
             f"{r['shipped_rel']:.0e}. Leave-one-out: each basis image's exact attribution predicted from the other "
             f"images' (Spearman; mean over all images, and over the plain digits). Queries: the fidelity study's {len(kinds)} "
             f"({(kinds == 'test').sum()} test digits, {(kinds == 'drawn').sum()} drawn, {(kinds == 'off-distribution').sum()} "
             f"off-distribution); LDS protocol A on all {len(kinds)}, against the bank's committed retrains.", "",
             "| rows | rel | leave-one-out: all / digits | Spearman with exact: test / drawn / off-dist. (min) | "
             "top-16 proponents shared (min) | LDS: test / drawn / off-dist. (min) |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        loo = np.array(row["loo_spearman"])
        lines.append(f"| {row['scaling']} | {row['rel']:.0e} | {loo.mean():.3f} / {loo[images].mean():.3f} | {cells(row)} |")
    lines += ["", "| reference | Spearman with exact: test / drawn / off-dist. (min) | top-16 proponents shared (min) | "
              "LDS: test / drawn / off-dist. (min) |", "|---|---|---|---|"]
    lines += [f"| {row['fit']} | {cells(row)} |" for row in r["references"]]
    lines += ["", "Share of each query's gradient the basis leaves unfitted, |g - G^T c| / |g|: "
              + ", ".join(f"{k} {un[kinds == k].mean():.2f} ({un[kinds == k].min():.2f}-{un[kinds == k].max():.2f})"
                          for k in ("test", "drawn", "off-distribution")) + "."]
    groups = sorted(r["unfitted_by_group"].items(), key=lambda kv: -kv[1]["share_of_unfitted"])
    lines += ["", f"Where the unfitted part lies (share of its squared norm over the {len(kinds)} queries), beside where the "
              "query gradients lie: " + ", ".join(f"`{n}` ({v['parameters']:,} parameters) {v['share_of_unfitted']:.2f} "
                                                  f"of it, {v['share_of_g']:.2f} of g" for n, v in groups[:4]) + "."]
    return "\n".join(lines) + "\n"


def _plot(r: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (key, title) in zip(axes, [("loo_spearman", "leave-one-out on the basis (Spearman)"),
                                       ("spearman_with_exact", f"Spearman with exact MAGIC ({len(r['kinds'])} queries)"),
                                       ("lds", f"LDS protocol A ({len(r['kinds'])} queries)")]):
        for scaling in ("raw", "normalized"):
            rows = [row for row in r["rows"] if row["scaling"] == scaling]
            ax.plot([row["rel"] for row in rows], [np.mean(row[key]) for row in rows], "o-", label=f"{scaling} rows")
        if key != "loo_spearman":
            for ref in r["references"][:4]:  # the metric variants after these are in the table, not drawn
                ax.axhline(np.mean(ref[key]), lw=0.8, ls=":", color="gray")
                ax.text(RELS[0], np.mean(ref[key]), ref["fit"], fontsize=6, va="bottom")
        ax.axvline(r["shipped_rel"], lw=0.8, color="black")
        ax.set_xscale("log")
        ax.set_xlabel("rel (ridge / mean squared row norm)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    from engine.experiments.plots import png_bytes
    return png_bytes(fig)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
