"""experiments/basis_coverage.py: the unfitted share is 0 for a query in the basis's span, 1 for one
orthogonal to it, sin(angle) for one in between; the parameter groups' shares are where it lies."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import basis_coverage  # noqa: E402


def test_unfitted_share_against_closed_form():
    rng = np.random.default_rng(0)
    p = 30
    basis_g = np.zeros((3, p))
    basis_g[:, :3] = rng.standard_normal((3, 3))        # spans the first 3 coordinates
    inside = np.r_[rng.standard_normal(3), np.zeros(p - 3)]
    outside = np.r_[np.zeros(3), rng.standard_normal(p - 3)]
    angle = 0.4                                           # a unit query at this angle to the span
    mixed = np.cos(angle) * inside / np.linalg.norm(inside) + np.sin(angle) * outside / np.linalg.norm(outside)
    masks = {"first": np.arange(p) < 3, "rest": np.arange(p) >= 3}
    share, where = basis_coverage.unfitted(basis_g, np.stack([inside, outside, mixed]), masks)
    np.testing.assert_allclose(share, [0.0, 1.0, np.sin(angle)], atol=1e-3)  # the ridge term leaves ~1e-4
    assert where["rest"]["share_of_unfitted"] > 0.999      # what the basis misses lies outside its coordinates
    assert abs(where["first"]["share_of_unfitted"] + where["rest"]["share_of_unfitted"] - 1) < 1e-12
    assert where["first"]["parameters"] == 3 and where["rest"]["parameters"] == p - 3


def test_kinds():
    assert [basis_coverage.kind(n) for n in ("test:12", "drawn 7", "rotated test:3", "noise", "average of 4")] == \
        ["test", "drawn", "off-dist.", "off-dist.", "off-dist."]


def test_positional_maps_are_told_apart_by_size():
    # with the finer levels left without maps, pos.0 is the 14x14 map: the report names maps by size
    from types import SimpleNamespace

    from engine.model import build_model
    net = build_model((8, 16, 16), 16, 4, seed=0, positional=1.0, positional_from=1)
    params = dict(net.named_parameters())
    run = SimpleNamespace(load_final=lambda: SimpleNamespace(model_params=params))
    p = sum(t.numel() for t in params.values())
    masks = basis_coverage.masks_by_map(run, p)
    assert [n for n in masks if n.startswith("pos")] == ["pos 14x14", "pos 7x7"]
    assert masks["pos 14x14"].sum() == 16 * 14 * 14 and masks["pos 7x7"].sum() == 16 * 7 * 7
    assert (sum(m.astype(int) for m in masks.values()) == 1).all()  # every parameter in exactly one group


def test_principal_directions_keep_the_most_of_the_basis():
    # rows along the coordinate axes with known energies: the 2 principal directions are the two
    # axes that carry the most, and a query in their span is fitted exactly, one along the third not at all
    p = 6
    basis_g = np.zeros((4, p))
    basis_g[0, 0], basis_g[1, 1], basis_g[2, 2], basis_g[3, 1] = 1.0, 3.0, 2.0, 1.5
    v = basis_coverage.principal(basis_g, 2)
    np.testing.assert_allclose(v @ v.T, np.eye(2), atol=1e-12)           # orthonormal rows
    np.testing.assert_allclose(np.abs(v), np.eye(p)[[1, 2]], atol=1e-12)  # axes 1 (3^2 + 1.5^2) and 2 (2^2)
    queries = np.stack([np.eye(p)[1] + 2 * np.eye(p)[2], np.eye(p)[0]])
    share, _ = basis_coverage.unfitted(v, queries, {"all": np.ones(p, bool)})
    np.testing.assert_allclose(share, [0.0, 1.0], atol=1e-3)
    # no k rows of the basis itself keep more of it than its k principal directions
    kept = lambda rows: (np.linalg.norm(basis_g @ np.linalg.pinv(rows) @ rows) ** 2)  # noqa: E731
    assert kept(v) >= max(kept(basis_g[list(c)]) for c in [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]) - 1e-9


def test_a_larger_bases_gradients_serve_a_smaller_one(tmp_path, monkeypatch):
    # the bases are nested, so the first k rows of a larger basis's kept gradients are the k-image
    # basis's: computed fresh they agree, and once kept they are read, not recomputed
    import torch

    from engine import training
    from engine.presets import PRESETS
    from engine.store import load_run
    training.train(PRESETS["tiny"], seed=0, out=tmp_path / "a")
    training.train(PRESETS["tiny"], seed=0, out=tmp_path / "b")
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    q = {"noise": torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(1)), "blank": torch.zeros(1, 28, 28)}
    big, g_big = basis_coverage.gradients(a, 6, q)
    small, g_small = basis_coverage.gradients(b, 3, q)
    assert big.shape[0] == 6 and small.shape[0] == 3
    np.testing.assert_allclose(big[:3], small, rtol=1e-4, atol=1e-7 * np.abs(small).max())
    np.testing.assert_allclose(g_big, g_small, rtol=1e-4, atol=1e-7 * np.abs(g_small).max())
    import engine.bpd

    def no_bpd(*args, **kwargs):
        raise AssertionError("recomputed")
    monkeypatch.setattr(engine.bpd, "run_bpd", no_bpd)
    kept, _ = basis_coverage.gradients(a, 3, q)
    np.testing.assert_array_equal(kept, big[:3])
    with pytest.raises(AssertionError, match="recomputed"):  # other queries are not taken from the file
        basis_coverage.gradients(a, 3, {"noise": q["noise"]})
