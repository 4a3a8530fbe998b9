"""Baselines on `tiny`: shapes, the sign convention, TRAK through traker against the exact
formula, and LDS of several methods (protocols A and B) sharing one retraining bank."""

import json

import numpy as np
import pytest
import torch
from engine import cli, data, methods, training as train
from engine.experiments import bank, lds, protocols
from engine.baselines import trak as T
from engine.errors import UserError
from engine.presets import PRESETS
from engine.store import load_run

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "run"
    train.train(TINY, seed=0, out=out)
    return load_run(out)


@pytest.fixture(scope="module")
def images():
    return data.load_train(TINY.n_train, TINY.source)[0]


def _self_ranks(s: np.ndarray, idx) -> list[int]:
    """Where each query's own training index falls when sorted from strongest proponent."""
    return [int(np.where(np.argsort(s[i], kind="stable") == j)[0][0]) for i, j in enumerate(idx)]


def test_each_baseline_has_grad_w_shape_and_sign(tiny_run, images):
    # A training image as the query is its own strongest proponent (most negative score) for
    # every method, when the query is seen exactly as it was featurized: for TRAK that is the
    # regression identity (Phi Phi^T + lambda)^{-1} Phi Phi^T e_i ~ e_i with little damping, so
    # a flipped sign or a transposed score matrix puts it last.
    idx = [0, 1, 2]
    x = images[idx]
    for m in ("pixel", "feature"):
        s = methods.get(m).score(tiny_run, x).scores
        assert s.shape == (3, TINY.n_train) and np.isfinite(s).all()
        assert _self_ranks(s, idx) == [0, 0, 0], m
    for v in ("trak", "dtrak"):
        s = T.trak_scores(tiny_run, images, x, v, proj_dim=512, target_stream=0, damping=1e-4)
        assert s.shape == (3, TINY.n_train) and np.isfinite(s).all()
        assert _self_ranks(s, idx) == [0, 0, 0], v
    # likelihood-TRAK's adapter (precomputed target gradients): fed the loss gradients TRAK
    # itself featurized, it must give TRAK's scores
    g = T.per_example_grads(tiny_run, x, "trak", stream=0)
    lt = T.trak_scores(tiny_run, images, x, "ltrak", proj_dim=512, target_grads=g, damping=1e-4)
    tr = T.trak_scores(tiny_run, images, x, "trak", proj_dim=512, target_stream=0, damping=1e-4)
    np.testing.assert_allclose(lt, tr, rtol=1e-3, atol=1e-3 * np.abs(tr).max())
    with pytest.raises(UserError):
        methods.get("nope")


def test_trak_through_traker_matches_the_exact_formula(tiny_run, images):
    # traker: projected (k = 4096), Phi^T Phi inverted in k dims, rescaled by a positive constant.
    # Exact: unprojected gradients, the n x n kernel. Equal up to that constant and JL error.
    x = data.load_test()[0][:2]
    gt = T.per_example_grads(tiny_run, images, "trak", stream=0)
    gq = T.per_example_grads(tiny_run, x, "trak", stream=1)
    exact = T.exact_scores(gt, gq, damping=0.1)
    for k, tol in ((4096, 0.1),):
        s = T.trak_scores(tiny_run, images, x, "trak", proj_dim=k, damping=0.1)
        for a, b in zip(s, exact):
            c = a @ b / (b @ b)
            assert c > 0
            assert np.linalg.norm(a - c * b) / np.linalg.norm(a) < tol
    # and a small projection is visibly worse: the comparison can fail
    s16 = T.trak_scores(tiny_run, images, x, "trak", proj_dim=16, damping=0.1)
    a, b = s16[0], exact[0]
    assert np.linalg.norm(a - (a @ b / (b @ b)) * b) / np.linalg.norm(a) > 0.2


def test_trak_ensemble_averages_its_members(tiny_run, images):
    # traker projects each member with its own random matrix and averages the members' scores:
    # an ensemble whose second member is the run's own model again is the exact formula up to
    # JL error (closer than one model, two projections averaged); an independently trained
    # member changes the scores; the method file trains its members once and keeps them
    x = data.load_test()[0][:2]
    exact = T.exact_scores(T.per_example_grads(tiny_run, images, "dtrak", stream=0),
                           T.per_example_grads(tiny_run, x, "dtrak", stream=1), damping=0.01)

    def residual(a, b):  # worst relative distance of a row of a from the line of b's row
        return max(np.linalg.norm(u - (u @ v / (v @ v)) * v) / np.linalg.norm(u) for u, v in zip(a, b))
    one = T.trak_scores(tiny_run, images, x, "dtrak", proj_dim=4096)
    same = T.trak_scores(tiny_run, images, x, "dtrak", proj_dim=4096, ensemble=[tiny_run.model()])
    assert residual(same, exact) < min(0.1, residual(one, exact))
    from engine.methods import trak_ensemble as E
    m = methods.get("dtrak_ens")
    members = m.members(tiny_run)
    assert len(members) == E.ENSEMBLE - 1
    assert len(list((tiny_run.path / "methods" / "ensemble").glob("*.pt"))) == E.ENSEMBLE - 1
    assert residual(T.trak_scores(tiny_run, images, x, "dtrak", proj_dim=4096, ensemble=members[:1]), one) > 0.3
    again = m.members(tiny_run)  # read back, not retrained: the same parameters
    assert all(torch.equal(a.state_dict()["out.bias"], b.state_dict()["out.bias"]) for a, b in zip(members, again))


def test_lds_methods_share_retrains_and_protocol_b_averages_seeds(tiny_run, tmp_path, monkeypatch):
    from engine.methods import magic_mean
    # 2 digits in 2 chunks, not 16 in 2: the same mechanics (each digit costs a BPD gradient)
    monkeypatch.setattr(magic_mean, "N_DIGITS", 2)
    monkeypatch.setattr(magic_mean, "CHUNK", 1)
    out = tmp_path / "lds"
    q = data.query_indices(1)
    stages = []
    rep = lds.run_lds(tiny_run, out, q, method="pixel", protocol="B", k=3, seeds=2, jobs=2,
                      callback=lambda i: stages.append((i["stage"], i.get("i"))))
    assert stages[0] == ("retrain", 0) and stages[-1] == ("retrain", 6)  # 3 subsets x 2 seeds
    assert rep["drop_size"] == TINY.n_train - 32 and rep["seeds"] == 2
    assert (out / "reports" / "pixel_B.json").is_file() and (out / "reports" / "pixel_B.png").is_file()
    # the actual value is the mean over the seeds' retrains, and each is a real retrain with
    # its own seed (run.seed + s)
    keep = protocols.keep_sets(TINY.n_train, 3, 0.5, 0)[1]
    drop = np.setdiff1d(np.arange(TINY.n_train), keep)
    def bank_file(j: int, s: int) -> dict:  # the retrain of subset j with seed s, from its own file
        keep_j = protocols.keep_sets(TINY.n_train, 3, 0.5, 0)[j]
        d = np.setdiff1d(np.arange(TINY.n_train), keep_j)
        return json.loads((out / "bank" / f"{bank.key(tiny_run.digest, s, d)}.json").read_text())

    per_seed = [bank_file(1, s) for s in (0, 1)]
    assert all(r["drop"] == drop.tolist() and r["seed"] == s for s, r in enumerate(per_seed))
    assert per_seed[0]["bpd"] != per_seed[1]["bpd"]
    x = data.load_test()[0][q]
    assert bank.retrain_bpd(TINY, 1, drop, x)[0] == pytest.approx(per_seed[1]["bpd"][str(q[0])], abs=1e-6)
    bpd0 = float(np.load(out / "bpd.npz")["bpd"][0])
    mean = (per_seed[0]["bpd"][str(q[0])] + per_seed[1]["bpd"][str(q[0])]) / 2
    assert rep["queries"][0]["actual_change"][1] == pytest.approx(mean - bpd0, abs=1e-9)
    # predicted: minus the scores summed over the dropped images
    s = np.load(out / "scores" / "pixel.npz")["scores"]
    assert rep["queries"][0]["predicted_change"][1] == pytest.approx(-s[0, drop].sum())
    # each seed on its own: Spearman of the predictions against that seed's retrains (from its files)
    from scipy.stats import spearmanr
    pred = rep["queries"][0]["predicted_change"]
    for s_ in (0, 1):
        own = [bank_file(j, s_)["bpd"][str(q[0])] for j in range(3)]
        got = rep["spearman_by_seed"][s_]
        assert got["seed"] == s_ and got["mean"] == pytest.approx(spearmanr(pred, own)[0])
    seeds_bpd = [[bank_file(j, s_)["bpd"][str(q[0])] for j in range(3)] for s_ in (0, 1)]
    assert rep["seed_agreement"] == pytest.approx(spearmanr(*seeds_bpd)[0])
    # the comparison (CLI): a second method reuses every protocol-B retrain; protocol A adds its own
    stages.clear()
    # a report stem with dots in it (results/comparison_lr2.5e-4) keeps them
    rc = cli.main(["compare", "--run", str(tiny_run.path), "--out", str(out), "--report", str(tmp_path / "cmp_2.5e-4"),
                   "--method", "pixel,feature,random,magic_mean", "--query-index", str(q[0]), "--drop-sets", "3", "--subsets", "3",
                   "--seeds", "2", "--jobs", "2", "--json"])
    assert rc == 0
    comp = json.loads((tmp_path / "cmp_2.5e-4.json").read_text())
    assert [(r["method"], r["protocol"]) for r in comp["rows"]] == [
        (m, p) for p in "AB" for m in ("pixel", "feature", "random", "magic_mean")]
    assert comp["rows"][4]["per_query"] == [rep["queries"][0]["spearman"]]  # B for pixel: the same numbers
    assert len(list((out / "bank").glob("*.json"))) == 6 + 3  # protocol B's 3 x 2, then A's 3
    # the query-agnostic mean is the mean of MAGIC over its digits, whatever the query
    digits = np.load(tiny_run.path / "methods" / "magic_mean.npz")
    assert digits["grad_w"].shape == (magic_mean.N_DIGITS, TINY.n_train)
    np.testing.assert_allclose(np.load(out / "scores" / "magic_mean.npz")["scores"][0], digits["grad_w"].mean(0))
    # made in parallel chunks of replays (attribute_many, which tests/test_executor.py holds to one
    # replay of all the queries): the last chunk's last digit is that digit's MAGIC
    from engine.attribution import attribute
    want, _ = attribute(tiny_run, data.load_test()[0][digits["test_indices"][-1:]])
    assert np.linalg.norm(digits["grad_w"][-1] - want[0]) / np.linalg.norm(want[0]) <= 1e-5
    assert len(list((tiny_run.path / "methods" / "magic_mean.parts").glob("chunk_*.npz"))) == magic_mean.N_DIGITS // magic_mean.CHUNK
    md = (tmp_path / "cmp_2.5e-4.md").read_text()
    assert md.startswith("# LDS comparison on `tiny` (") and comp["preset_label"] == "`tiny`"
    assert "| random |" in md and "| magic_mean |" in md
    assert "| pixel |" in md and "D-TRAK" in md and (tmp_path / "cmp_2.5e-4.png").stat().st_size > 1000
    assert f"| pixel | {rep['spearman_by_seed'][0]['mean']:.3f} | {rep['spearman_by_seed'][1]['mean']:.3f} |" in md
    assert f"Spearman {rep['seed_agreement']:.3f}" in md
    with pytest.raises(UserError):
        lds.run_lds(tiny_run, out, q, method="nope")
    with pytest.raises(UserError):
        lds.run_lds(tiny_run, out, q, method="pixel", protocol="B", alpha=1.5)


def test_a_new_method_is_one_file(tiny_run, tmp_path):
    # a module dropped into engine/methods/ is found by the registry and scored by lds, with no
    # other change anywhere
    import importlib
    import pathlib
    import sys as _sys
    from engine import methods as registry
    path = pathlib.Path(registry.__file__).parent / "zz_probe_for_tests.py"
    path.write_text(
        "import numpy as np\n"
        "from engine.methods import register\n"
        "from engine.methods.base import Method, Scores\n\n\n"
        "class Probe(Method):\n"
        "    name, description, cost = 'probe', 'minus the pixel sum of each training image', 'nothing'\n\n"
        "    def score(self, run, x, callback=None):\n"
        "        from engine import data\n"
        "        s = data.load_train(run.preset.n_train, run.preset.source)[0].reshape(run.preset.n_train, -1).sum(1)\n"
        "        return Scores(-np.tile(s.numpy(), (len(x), 1)))\n\n\n"
        "register(Probe())\n")
    try:
        importlib.invalidate_caches()
        assert "probe" in registry.names()
        rc = cli.main(["lds", "--run", str(tiny_run.path), "--out", str(tmp_path / "lds"), "--method", "probe",
                       "--queries", "1", "--drop-sets", "3", "--jobs", "1", "--json"])
        assert rc == 0
        rep = json.loads((tmp_path / "lds" / "reports" / "probe_A.json").read_text())
        assert rep["method"] == "probe" and len(rep["queries"][0]["predicted_change"]) == 3
    finally:
        path.unlink()
        registry._REGISTRY.pop("probe", None)
        _sys.modules.pop("engine.methods.zz_probe_for_tests", None)
