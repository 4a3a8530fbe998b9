"""MAGIC scores predict actual retraining: the sign convention and the ranking, on `tiny`."""

import numpy as np
import pytest
from engine import attribution as A, data, training as train
from engine.experiments import bank, lds, protocols
from engine.errors import UserError
from engine.presets import PRESETS
from engine.store import load_run

TINY = PRESETS["tiny"]


def test_lds_predictions_track_actual_retraining_and_resume(tmp_path):
    train.train(TINY, seed=0, out=tmp_path / "run")
    run = load_run(tmp_path / "run")
    q = data.query_indices(1)
    out = tmp_path / "lds"
    rep = lds.run_lds(run, out, q, k=10, frac=0.1, jobs=2)
    r = rep["queries"][0]
    assert rep["drop_size"] == 7 and len(r["actual_change"]) == 10
    assert r["spearman"] > 0.8, r["spearman"]  # ~0.94 measured on this setup; a wrong sign gives about -1

    # the retrain's BPD is the same function the attribution differentiates: an empty drop
    # reproduces the run's BPD exactly (training is deterministic)
    x = data.load_test()[0][q]
    assert bank.retrain_bpd(TINY, 0, np.array([], np.int64), x)[0] == pytest.approx(r["bpd"], abs=1e-6)

    # predicted change follows the sign convention: BPD(1) - sum grad_w over the set
    with np.load(out / "scores" / "magic.npz") as f:
        gw, bpd = f["scores"], f["bpd"]
    s0 = protocols.drop_sets(TINY.n_train, 10, 0.1, 0)[0]  # ceil(0.1 * 64) = 7 images
    assert r["predicted_change"][0] == pytest.approx(A.predict_removal(bpd[0], gw[0], s0) - bpd[0], rel=1e-6)

    # resume: only the missing retrain is redone, the attribution is reused
    (out / "bank" / f"{bank.key(run.digest, run.seed, protocols.drop_sets(TINY.n_train, 10, 0.1, 0)[3])}.json").unlink()
    stages = []
    rep2 = lds.run_lds(run, out, q, k=10, frac=0.1, jobs=1, callback=lambda i: stages.append((i["stage"], i.get("i"))))
    assert stages == [("retrain", 9), ("retrain", 10)]
    assert rep2["queries"][0]["actual_change"] == pytest.approx(r["actual_change"], abs=1e-6)
    assert (out / "reports" / "magic_A.png").is_file()


def test_drop_sets_are_reproducible_and_refuse_bad_sizes():
    a = protocols.drop_sets(500, 50, 0.01, 0)
    assert a.shape == (50, 5) and (a == protocols.drop_sets(500, 50, 0.01, 0)).all()
    assert all(len(set(row)) == 5 for row in a)
    for k, frac in ((50, 0.0), (50, 1.0), (2, 0.01)):
        with pytest.raises(UserError):
            protocols.drop_sets(500, k, frac, 0)


def test_top_k_follows_the_sign_convention():
    g = np.array([0.5, -2.0, 0.0, 3.0, -1.0])
    tk = A.top_k(g, 2)
    assert tk["proponents"].tolist() == [1, 4]  # most negative: removing them raises the BPD
    assert tk["opponents"].tolist() == [3, 0]
    assert A.predict_removal(4.0, g, [1, 3]) == pytest.approx(4.0 - (-2.0 + 3.0))
