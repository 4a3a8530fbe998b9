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


def test_progressive_adds_the_preview_by_the_learning_rate_share_of_the_steps_not_replayed():
    # closed form: lr_at is linear warmup then linear decay; nothing replayed gives the preview,
    # everything replayed the replay's own sum, and in between the earlier steps' share of the lr
    p = PRESETS["tiny"]
    rng = np.random.default_rng(0)
    preview, partial = rng.normal(size=(2, p.n_train)), rng.normal(size=(2, p.n_train))
    np.testing.assert_allclose(A.progressive(preview, np.zeros_like(partial), 0, p), preview)
    np.testing.assert_allclose(A.progressive(preview, partial, p.steps, p), partial)
    lr = [train.lr_at(k, p) for k in range(p.steps)]
    for done in (1, p.steps // 2, p.steps - 1):
        share = sum(lr[: p.steps - done]) / sum(lr)
        assert 0 < share < 1
        np.testing.assert_allclose(A.progressive(preview, partial, done, p), partial + share * preview)
