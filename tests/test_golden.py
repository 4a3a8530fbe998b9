"""`bpd`, `attribute` and `lds` on `tiny` give the outputs in tests/golden/ (made by
tests/golden/make_golden.py). History: first made with the code of commit 15121fb, before the
attribution-method registry, and matched by every later commit; remade when `tiny`'s likelihood
grid went from 4 RK4 steps to 2 (a deliberate change of every `tiny` number), with the code that
the files' `commit` names. Measured bit-identical on the machine that made them until the BPD
gradient moved to two phases (engine.likelihood.bits_per_dim_and_grad), which sums the same float32
terms in another order: grad_w then agrees to 1e-5 relative (as a vector; an entry near zero may
move by a few times 1e-9 bits/dim) and the BPD itself is unchanged. The tolerances allow for that
and for another CPU's rounding: on another machine's CPU than the one that made the
files, grad_w moved by 1.2e-5 relative and one retrained BPD difference by 9.5e-7 bits/dim (one
float32 step at a BPD of 9), so grad_w is held to 1e-4 relative and a BPD difference to 4e-6
bits/dim (four such steps), 8 and 4 times what was measured. When `ScoreNet.jacobian_diagonal` came
to keep tangents in a local form (the same sums, again in another float32 order; its BPD gradient is
as far from a float64 one as before: 8.8e-7 against 8.6e-7 relative on the `cpu` default), grad_w
moved by 2.0e-5 and 1.2e-5 relative and one entry of 5.3e-5 by 4.3e-7, more than the entry-wise
floor of 1e-5 of the largest entry then allowed: that floor is now 1e-4 of it, the vector's own
tolerance."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(HERE))
import make_golden  # noqa: E402


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    return tmp, make_golden.run_all(tmp)


def test_bpd_is_unchanged(outputs):
    _, res = outputs
    want = json.loads((HERE / "tiny" / "bpd.json").read_text())
    assert [r["input"] for r in res["bpd"]] == [r["input"] for r in want]
    np.testing.assert_allclose([r["bpd"] for r in res["bpd"]], [r["bpd"] for r in want], rtol=1e-6)


def test_attribute_is_unchanged(outputs):
    tmp, _ = outputs
    with np.load(HERE / "tiny" / "attribute.npz") as want, np.load(tmp / "attribute.npz") as got:
        assert got["grad_w"].shape == want["grad_w"].shape
        g, w = got["grad_w"], want["grad_w"]
        rel = np.linalg.norm(g - w, axis=1) / np.linalg.norm(w, axis=1)
        assert (rel <= 1e-4).all(), rel
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
        np.testing.assert_allclose(got["bpd"], want["bpd"], rtol=1e-6)
        assert got["inputs"].tolist() == want["inputs"].tolist()


def test_lds_is_unchanged(outputs):
    tmp, _ = outputs
    want = json.loads((HERE / "tiny" / "lds.json").read_text())
    got = json.loads(make_golden.lds_report(tmp).read_text())
    for k in ("protocol", "method", "preset", "run_digest", "n_train", "drop_sets", "drop_size", "frac", "seed"):
        assert got[k] == want[k], k
    for g, w in zip(got["queries"], want["queries"], strict=True):
        assert (g["query"], g["label"]) == (w["query"], w["label"])
        np.testing.assert_allclose(g["predicted_change"], w["predicted_change"], rtol=1e-4,
                                   atol=1e-5 * np.abs(w["predicted_change"]).max())
        np.testing.assert_allclose(g["actual_change"], w["actual_change"], rtol=1e-4, atol=4e-6)
        assert g["bpd"] == pytest.approx(w["bpd"], rel=1e-6)
        assert g["spearman"] == pytest.approx(w["spearman"], abs=1e-9)
