"""experiments/basis_coverage.py: the unfitted share is 0 for a query in the basis's span, 1 for one
orthogonal to it, sin(angle) for one in between; the parameter groups' shares are where it lies."""

import sys
from pathlib import Path

import numpy as np

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
