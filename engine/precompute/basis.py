"""A query basis for precomputed replays: the exact BPD gradients of K fixed images.

Query gradients g = d BPD / d theta_T are what the replay J^T is applied to, and they come from
images; so instead of a basis of J's range (engine.precompute.build "lowrank"), replay the
gradients G (K, P) of K varied images once: A = J^T G^T (n, K). A new query's g is then written
in that basis by ridge least squares, c = (G G^T + lam I)^-1 G g, and grad_w ~ A c: the
representation's B = (G G^T + lam I)^-1 G (K, P). Exact for any g in the span of G; elsewhere
it keeps the part of g the basis spans (the study in results/precompute/ measures how much).

The images are fixed by the run's seed and K (nested: the first K of a larger basis are these):
test digits, their rotations, averages of 4 and uniform noise, none of them among the test digits
that the evaluations use as queries (data.query_indices seeds 0 and 99, query-agnostic MAGIC's).
"""

from __future__ import annotations

import numpy as np
import torch

from engine import data

SEED = 2024
# share of each kind, in the order the basis cycles through them (so any prefix is a mix)
KINDS = ("digit", "digit", "rotated", "digit", "average", "digit", "rotated", "noise")


def _excluded() -> set[int]:
    from engine.methods import magic_mean
    return (set(data.query_indices(64, 0)) | set(data.query_indices(200, 99))
            | set(data.query_indices(magic_mean.N_DIGITS, magic_mean.SEED)))


def images(k: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The basis images (k, 1, 28, 28) in [0, 1] and a name for each."""
    test_x = data.load_test()[0]
    bad = _excluded()
    pool = iter([i for i in data.query_indices(2000, SEED + seed) if i not in bad])
    gen = torch.Generator().manual_seed(SEED + seed)
    out, names = [], []
    for j in range(k):
        kind = KINDS[j % len(KINDS)]
        if kind == "digit":
            i = next(pool)
            out.append(test_x[i])
            names.append(f"test:{i}")
        elif kind == "rotated":
            i = next(pool)
            angle = (90, 180, 270)[(j // len(KINDS)) % 3]
            out.append(data.rotate(test_x[i], angle))
            names.append(f"rotated {angle} test:{i}")
        elif kind == "average":
            idx = [next(pool) for _ in range(4)]
            out.append(data.average(test_x[idx]))
            names.append("average " + ",".join(map(str, idx)))
        else:
            out.append(data.uniform_noise(1, gen)[0])
            names.append("noise")
    return torch.stack(out), names


# The ridge term relative to the rows' mean squared norm. experiments/basis_fit.py swept it on the
# default's basis (results/basis_fit_cpu): LDS and Spearman with exact MAGIC are flat from 1e-8 to
# 1e-4 and fall beyond 1e-3, so it only keeps the solve well conditioned.
RIDGE_REL = 1e-4


def regularized(gram: np.ndarray, rel: float = RIDGE_REL) -> np.ndarray:
    """G G^T + lam I (K, K) for the Gram matrix G G^T (K, K), lam = rel * mean squared norm of the rows."""
    return gram + rel * np.trace(gram) / len(gram) * np.eye(len(gram))


def ridge_inverse(g: np.ndarray, rel: float = RIDGE_REL) -> tuple[np.ndarray, np.ndarray]:
    """B = (G G^T + lam I)^-1 G (K, P) for G (K, P) (lam as in `regularized`), and
    M = G G^T + lam I (K, K): c = B g is the ridge least-squares coefficient vector of g in
    the rows of G, and G = M B recovers the basis (for `truncate`)."""
    g64 = g.astype(np.float64)
    m = regularized(g64 @ g64.T, rel)
    return np.linalg.solve(m, g64), m


def truncate(rep, k: int):
    """The representation of the first k basis images alone (the basis is nested), (A, B) refitted."""
    from engine.precompute.representation import Representation
    g = (rep.extra["gram"] @ rep.b.astype(np.float64))[:k]
    b, m = ridge_inverse(g)
    return Representation(f"{rep.name}[:{k}]", rep.method, rep.a[:, :k], b.astype(np.float32), rep.info, {"gram": m})


def digit_columns(rep) -> list[int]:
    """The columns of a query basis's A that are plain test digits' exact attributions (their
    mean is a query-agnostic attribution, what 'particular to this image' is measured against)."""
    return [j for j, n in enumerate((rep.info or {}).get("images", [])) if str(n).startswith("test:")]
