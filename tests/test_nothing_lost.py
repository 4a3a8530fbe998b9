"""Nothing lost or skipped silently: a replay refuses an incomplete trajectory, retrains are never
deleted when the queries change, and a kept result that cannot be used is recomputed with a
note saying why."""

import logging

import numpy as np
import pytest
import torch

from engine import data, files, training as train
from engine.errors import UserError
from engine.experiments import lds
from engine.metagrad import metagradient
from engine.presets import PRESETS
from engine.store import load_run

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lost") / "run"
    train.train(TINY, seed=0, out=out)
    return load_run(out)


def test_a_gap_in_the_trajectory_is_an_error_not_a_shorter_sum(run, tmp_path):
    import shutil
    shutil.copytree(run.path, tmp_path / "run")
    gap = load_run(tmp_path / "run")
    (gap.path / "traj" / f"step_{TINY.ckpt_every:06d}.pt").unlink()  # a middle segment's state
    g = [{n: torch.ones_like(p) for n, p in gap.load_final().params.items()}]
    with pytest.raises(UserError, match="incomplete trajectory"):
        metagradient(gap, data.load_train(TINY.n_train)[0], g)


def test_retrains_survive_other_queries_and_seeds(run, tmp_path):
    out = tmp_path / "lds"
    lds.run_lds(run, out, [0], method="pixel", k=3, frac=0.1, jobs=1)
    first = {p.name: p.read_text() for p in (out / "bank").glob("*.json")}
    assert len(first) == 3
    lds.run_lds(run, out, [1], method="pixel", k=3, frac=0.1, seed=5, jobs=1)  # other query, other sets
    now = {p.name: p.read_text() for p in (out / "bank").glob("*.json")}
    assert set(first) <= set(now) and len(now) == 6  # nothing deleted; the new sets added
    stages = []
    rep = lds.run_lds(run, out, [0], method="pixel", k=3, frac=0.1, jobs=1,
                      callback=lambda i: stages.append((i["stage"], i.get("i"))))
    assert stages == [("retrain", 3)]  # the first query's retrains are all still there
    assert len(rep["queries"][0]["actual_change"]) == 3


def test_a_stale_or_unreadable_result_is_recomputed_with_a_reason(tmp_path, caplog):
    path = tmp_path / "r.npz"
    calls = []

    def compute():
        calls.append(1)
        return {"v": np.arange(3)}
    with caplog.at_level(logging.INFO, logger="engine"):
        files.load_or_compute(path, {"run_digest": "a"}, compute, what="thing")
        files.load_or_compute(path, {"run_digest": "a"}, compute, what="thing")  # kept: not recomputed
        files.load_or_compute(path, {"run_digest": "b"}, compute, what="thing")
        path.write_bytes(path.read_bytes()[:20])
        files.load_or_compute(path, {"run_digest": "b"}, compute, what="thing")
    assert len(calls) == 3
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["computing thing (not computed yet)", "computing thing (r.npz was made for another run digest)",
                     "computing thing (r.npz is unreadable (BadZipFile))"]


def test_the_bank_takes_any_image_beside_test_digits_and_asks_only_what_it_lacks(run, tmp_path):
    from engine.executor import LocalExecutor
    from engine.experiments import bank
    rot = data.rotate(data.load_test()[0][5], 90)
    k = bank.image_key(rot)
    drops = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    kw = dict(protocol="A", settings={"frac": 0.1, "seed": 0}, executor=LocalExecutor(1))
    first = bank.retrained(run, tmp_path, [3], drops, 1, **kw)
    calls = []
    both = bank.retrained(run, tmp_path, [3, k], drops, 1, images={k: rot}, **kw,
                          callback=lambda i: calls.append(i["i"]))
    assert calls == [0, 1, 2]  # both retrains lacked the image and were redone for it alone
    np.testing.assert_array_equal(both[:, :1], first)  # the test digit's values kept, not recomputed
    want = bank.retrain_bpd(TINY, run.seed, drops[1], rot[None])
    np.testing.assert_allclose(both[0, 1, 1], want[0], rtol=1e-6)
    with pytest.raises(ValueError, match="no image given"):
        bank.retrained(run, tmp_path, ["img:0000"], drops, 1, **kw)
