"""How much of a query's BPD gradient a query basis spans, on runs with no replayed basis yet.

    python experiments/basis_coverage.py --runs runs/cpu,OTHER_RUN [--k 64] [--n-test 8]
        [--sizes 128,256,320 --principal 64] [--out results/basis_coverage]

The app's first answer, the preview from a query basis, is as good as the basis images' gradients G
(K, P) span a new query's gradient g (P,) (experiments/basis_fit.py, on the default: the unfitted
share |g - G^T c| / |g| is 0.48 on test digits, and the preview's agreement with exact MAGIC falls as
it grows). The share needs only BPD gradients, no replay of training, so a candidate model can be
judged for it before its basis (hours of replays) is made. Per run: the K basis images of
engine.precompute.basis (the run's seed), the fidelity study's queries (experiments/
precompute_fidelity.py: test digits, drawn digits, rotated, averaged and noise images), the ridge fit
the shipped basis uses, and per query kind the mean (lowest, highest) unfitted share, with where the
unfitted part lies by parameter group. With --sizes, also the share for larger bases (the first K
images of engine.precompute.basis for each K: the bases are nested), what more replays would buy;
with --principal K, for the K principal directions of the largest basis's gradients (the K rows
that hold the most of its gradients' squared norm), what choosing the basis vectors instead of the
images would buy (a precompute can replay any vectors, though vectors that are no image's gradient
give the app no per-digit columns). Each run's gradients are kept in RUN/basis_coverage*.npz (keyed by the run, K and the
queries; a larger K's file serves a smaller one), so an interrupted run resumes and a rerun
recomputes nothing. Writes coverage.{json,md} under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from basis_fit import fit, group_masks  # noqa: E402
from engine import atomic, provenance  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.presets import digest, label  # noqa: E402
from engine.store import load_run  # noqa: E402


def unfitted(basis_g: np.ndarray, g: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Share of each query gradient the basis leaves unfitted, |g - G^T c| / |g| (Q,), for basis
    gradients G (K, P) and queries g (Q, P) under the shipped ridge fit; and, per parameter group
    (masks: name -> (P,) bool), its share of the residuals' squared norm and of the queries'."""
    c = fit(basis_g @ basis_g.T, g @ basis_g.T)
    residual = g - c @ basis_g
    share = np.linalg.norm(residual, axis=1) / np.linalg.norm(g, axis=1)
    where = {n: {"parameters": int(m.sum()), "share_of_g": float((g[:, m] ** 2).sum() / (g ** 2).sum()),
                 "share_of_unfitted": float((residual[:, m] ** 2).sum() / (residual ** 2).sum())}
             for n, m in masks.items()}
    return share, where


def principal(basis_g: np.ndarray, k: int) -> np.ndarray:
    """The k principal directions (k, P) of the basis gradients G (K, P): the orthonormal rows V_k of
    G's singular value decomposition with the k largest singular values, the k-dimensional subspace
    that keeps the most of G's squared norm (Eckart-Young)."""
    if not 1 <= k <= len(basis_g):
        raise ValueError(f"{k} principal directions of {len(basis_g)} gradients")
    _, _, vt = np.linalg.svd(basis_g, full_matrices=False)
    return vt[:k]


def masks_by_map(run, p: int) -> dict[str, np.ndarray]:
    """(P,) bool masks of the parameter groups in a flat parameter vector, each positional map its
    own group named by its size (basis_fit.group_masks with by_map)."""
    return group_masks(run, p, by_map=True)


def kind(name: str) -> str:
    return "test" if name.startswith("test:") else "drawn" if name.startswith("drawn") else "off-dist."


def _key(run, k: int, names: list, qx) -> str:
    return digest({"run": run.digest, "k": k, "queries": names,
                   "x": digest({"sum": float(qx.double().sum()), "sq": float((qx.double() ** 2).sum())})})


def gradients(run, k: int, queries: dict, callback=None) -> tuple[np.ndarray, np.ndarray]:
    """BPD gradients (K, P) of the run's first k basis images and (Q, P) of the queries, flat in the
    parameters' order; kept in RUN/basis_coverage.npz (k 64) or RUN/basis_coverage_k<k>.npz under a
    key of the run, k and the queries. A file made for a larger k serves a smaller one: the first k
    images of a larger basis are the k-image basis's."""
    import torch

    from engine.bpd import run_bpd
    from engine.precompute import basis
    from engine.precompute.tangents import flatten
    names = list(queries)
    qx = torch.stack([queries[n] for n in names])
    for path in sorted(run.path.glob("basis_coverage*.npz")):
        try:
            with np.load(path, allow_pickle=False) as f:
                # the size from its own small entry: a non-matching file's gradients are never read
                kf = int(f["k"]) if "k" in f.files else len(f["basis_g"])
                if kf >= k and str(f["key"]) == _key(run, kf, names, qx):
                    return f["basis_g"][:k], f["g"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged file costs a recomputation, nothing else
    bx, _ = basis.images(k, run.seed)
    flat = []
    for part, x in (("basis", bx), ("queries", qx)):
        _, grads = run_bpd(run, x, grad=True)
        flat.append(torch.stack([flatten(gr) for gr in grads]).double().numpy())
        if callback:
            callback({"run": str(run.path), "done": part})
    path = run.path / ("basis_coverage.npz" if k == 64 else f"basis_coverage_k{k}.npz")
    atomic.save_npz(path, key=np.array(_key(run, k, names, qx)), k=np.array(k), basis_g=flat[0], g=flat[1])
    return flat[0], flat[1]


def table(report: dict) -> str:
    lines = [f"# How much of a query's BPD gradient a {report['k']}-image query basis spans", "",
             f"`{report['command']}` at commit {report['commit']}. Unfitted share |g - G^T c| / |g| under the "
             f"shipped ridge fit (0: the basis spans the query's gradient; 1: none of it), on the fidelity study's "
             f"{len(report['queries'])} queries; mean (lowest-highest) per kind. No replay: a basis's exact "
             "attributions are not needed for this.", "",
             "| run | model | test digits | drawn digits | off-distribution | share of the unfitted part (of g) in each positional map |",
             "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        cells = _cells(r["unfitted_share"], report["queries"])
        maps = [(n, v) for n, v in r["unfitted_by_group"].items() if n.startswith("pos ")]
        where = ", ".join(f"{n[4:]} {v['share_of_unfitted']:.2f} ({v['share_of_g']:.2f})" for n, v in maps) or "no positional maps"
        lines.append(f"| `{r['run']}` | {r['label']}, digest {r['run_digest'][:8]} | " + " | ".join(cells) + f" | {where} |")
    for r in report["runs"]:
        if not r.get("bases"):
            continue
        lines += ["", f"Larger bases on `{r['run']}` (digest {r['run_digest'][:8]}), the same queries and fit:", "",
                  "| basis | test digits | drawn digits | off-distribution |", "|---|---|---|---|"]
        for b in r["bases"]:
            lines.append(f"| {b['basis']} | " + " | ".join(_cells(b["unfitted_share"], report["queries"])) + " |")
    return "\n".join(lines)


def _cells(share: list, queries: list) -> list[str]:
    out = []
    for kd in ("test", "drawn", "off-dist."):
        v = np.array([s for s, q in zip(share, queries) if kind(q) == kd])
        out.append(f"{v.mean():.2f} ({v.min():.2f}-{v.max():.2f})" if len(v) else "…")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs/cpu", help="comma-separated run folders")
    ap.add_argument("--k", type=int, default=64, help="basis images (the first k of engine.precompute.basis)")
    ap.add_argument("--n-test", type=int, default=8, help="test digits among the queries")
    ap.add_argument("--sizes", default="", help="comma-separated larger basis sizes, each the first K images")
    ap.add_argument("--principal", type=int, default=0,
                    help="also the K principal directions of the largest basis's gradients (0: not)")
    ap.add_argument("--out", default="results/basis_coverage")
    a = ap.parse_args()
    provenance.start()
    from precompute_fidelity import queries
    try:
        if a.k < 1 or a.n_test < 1:
            raise UserError("--k and --n-test must be at least 1")
        try:
            sizes = sorted({int(v) for v in a.sizes.split(",") if v.strip()})
        except ValueError:
            raise UserError(f"--sizes must be whole numbers separated by commas, not {a.sizes!r}") from None
        if any(v <= a.k for v in sizes):
            raise UserError(f"every --sizes must be larger than --k ({a.k})")
        kmax = max([a.k] + sizes)
        if not 0 <= a.principal <= kmax:
            raise UserError(f"--principal must be between 1 and the largest basis ({kmax}), or 0")
        runs = [load_run(p) for p in a.runs.split(",") if p]
        if not runs:
            raise UserError("--runs names no run")
    except UserError as e:
        sys.exit(f"error: {e}")
    q = queries(a.n_test)
    rows = []
    for run in runs:
        all_g, g = gradients(run, kmax, q, callback=lambda e: print(f"{e['run']}: {e['done']} gradients", flush=True))
        masks = masks_by_map(run, g.shape[1])
        share, where = unfitted(all_g[:a.k], g, masks)
        bases = [{"basis": f"first {k} images", "k": k, "unfitted_share": unfitted(all_g[:k], g, masks)[0].tolist()}
                 for k in [a.k] + sizes if sizes or a.principal]
        if a.principal:
            bases.append({"basis": f"{a.principal} principal directions of the {kmax} images' gradients", "k": a.principal,
                          "unfitted_share": unfitted(principal(all_g, a.principal), g, masks)[0].tolist()})
        rows.append({"run": str(run.path), "run_digest": run.digest, "label": label(run.preset),
                     "unfitted_share": share.tolist(), "unfitted_by_group": where, "bases": bases})
    report = {**provenance.stamp(), "k": a.k, "queries": list(q), "runs": rows}
    report["table"] = table(report)
    out = Path(a.out)
    atomic.save_json(report, out / "coverage.json")
    atomic.save_text(report["table"] + "\n", out / "coverage.md")
    print(report["table"])


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
