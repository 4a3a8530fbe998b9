"""experiments/basis_fit.py: its fit is the basis's own ridge fit, and its leave-one-out measure
recovers an attribution exactly when the other images' gradients span it, and not otherwise."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import basis_fit  # noqa: E402

from engine.precompute import basis  # noqa: E402


def test_fit_is_the_basis_ridge_fit():
    rng = np.random.default_rng(0)
    g_basis, g = rng.standard_normal((6, 40)), rng.standard_normal((3, 40))
    for rel in (1e-6, basis.RIDGE_REL, 1.0):
        b, _ = basis.ridge_inverse(g_basis, rel)
        np.testing.assert_allclose(basis_fit.fit(g_basis @ g_basis.T, g @ g_basis.T, rel), g @ b.T, rtol=1e-9, atol=1e-12)


def test_leave_one_out_exact_when_spanned_and_not_otherwise():
    rng = np.random.default_rng(1)
    jt = rng.standard_normal((200, 5))          # J^T (n, P) of a linear "training", P = 5
    spanned = rng.standard_normal((12, 5))      # 12 images in 5 dimensions: any one is in the others' span
    loo = basis_fit.leave_one_out(spanned @ spanned.T, jt @ spanned.T, rel=1e-12)
    assert loo.min() > 0.999
    jt = rng.standard_normal((200, 500))
    apart = rng.standard_normal((12, 500))      # 12 random directions in 500: the other 11 span ~2% of one
    loo = basis_fit.leave_one_out(apart @ apart.T, jt @ apart.T, rel=1e-12)
    assert np.abs(loo).mean() < 0.3             # expected correlation about sqrt(11 / 500) = 0.15


def test_ceiling_recovers_a_spanned_answer_and_no_fit_comes_closer():
    rng = np.random.default_rng(2)
    jt = rng.standard_normal((300, 40))         # J^T (n, P)
    g_basis = rng.standard_normal((8, 40))
    a = jt @ g_basis.T                          # the basis's exact attributions (n, K)
    spanned = rng.standard_normal((2, 8)) @ g_basis  # queries inside the basis's span
    np.testing.assert_allclose(basis_fit.ceiling(a, spanned @ jt.T), spanned @ jt.T, rtol=1e-9, atol=1e-9)
    g = rng.standard_normal((3, 40))            # queries outside it
    exact = g @ jt.T
    best = basis_fit.ceiling(a, exact)
    for rel in (1e-8, basis.RIDGE_REL, 1.0):
        ridge = basis_fit.fit(g_basis @ g_basis.T, g @ g_basis.T, rel) @ a.T
        assert (np.linalg.norm(best - exact, axis=1) <= np.linalg.norm(ridge - exact, axis=1) + 1e-9).all()
    assert (np.linalg.norm(best - exact, axis=1) > 0.1 * np.linalg.norm(exact, axis=1)).all()  # not spanned: not exact
