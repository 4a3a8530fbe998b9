"""The Figure 2 report: its groups are what they claim, and an interrupted report resumes."""

import json

import numpy as np
import pytest
import torch

from engine import data, training as train
from engine.errors import UserError
from engine.experiments import figure2
from engine.presets import PRESETS
from engine.store import load_run


def test_groups_are_rotations_averages_and_noise():
    g = figure2.figure2_inputs(n=3, angle=90, k_avg=4, seed=0)
    test, _ = data.load_test()
    idx = data.query_indices(3 * 5, 0)
    assert torch.equal(g["original"], test[idx[:3]])
    assert torch.allclose(g["rotated"], torch.rot90(test[idx[:3]], 1, dims=(-2, -1)), atol=1 / 255 + 1e-6)
    assert torch.allclose(g["averaged"][0], data.quantize(test[idx[3:7]].mean(0)))
    assert g["noise"].std() > 0.25  # uniform on [0, 1] has std 0.29


def test_interrupted_report_resumes_to_the_same_numbers(tiny_figure2, tmp_path):
    tiny_run, reports, _ = tiny_figure2
    clean = reports["test"]  # made without interruption

    class Stop(Exception):
        pass

    def stop(info):
        if info["i"] == 3:
            raise Stop

    with pytest.raises(Stop):
        figure2.run_figure2(tiny_run, tmp_path / "b", n=2, callback=stop)
    assert (tmp_path / "b" / "figure2_partial.npz").exists() and not (tmp_path / "b" / "figure2.json").exists()
    seen = []
    resumed = figure2.run_figure2(tiny_run, tmp_path / "b", n=2, callback=lambda i: seen.append(i["i"]))
    assert seen == [4, 5, 6, 7, 8]  # the first three images were not recomputed
    assert resumed["bpd"] == clean["bpd"]
    assert json.loads((tmp_path / "b" / "figure2.json").read_text())["bpd"] == clean["bpd"]
    assert not (tmp_path / "b" / "figure2_partial.npz").exists()
    assert (tmp_path / "b" / "figure2.png").stat().st_size > 1000


def test_training_digits_are_the_ones_the_run_trained_on(tmp_path):
    # the seed's protocol: digits from the run's own training images, never one it was not given
    w = np.ones(PRESETS["tiny"].n_train, dtype=np.float32)
    w[::2] = 0.0
    out = tmp_path / "run"
    train.train(PRESETS["tiny"], seed=0, weights=w, out=out)
    run = load_run(out)
    images, _ = data.load_train(run.preset.n_train, run.preset.source)
    kept, dropped = images[1::2].flatten(1), images[::2].flatten(1)
    pool = figure2.training_pool(run)
    assert torch.equal(pool, images[1::2])
    g = figure2.figure2_inputs(n=3, angle=90, k_avg=4, seed=0, pool=pool)
    for x in g["original"].flatten(1):
        assert (kept == x).all(1).any() and not (dropped == x).all(1).any()
    assert len({tuple(x.tolist()) for x in g["original"].flatten(1)}) == 3
    with pytest.raises(UserError, match="pool holds 32"):
        figure2.figure2_inputs(n=7, angle=90, k_avg=4, seed=0, pool=pool)


def test_report_states_its_digits_and_the_paired_rotation_gap(tiny_figure2, tmp_path):
    tiny_run, reports, folders = tiny_figure2
    test, seen = reports["test"], reports["train"]
    assert (test["images"], seen["images"]) == ("test", "train")
    assert seen["bpd"]["original"] != test["bpd"]["original"]
    assert seen["bpd"]["noise"] == test["bpd"]["noise"]  # the same noise images, the same numbers
    for r in (test, seen):
        d = np.array(r["bpd"]["rotated"]) - np.array(r["bpd"]["original"])
        assert r["rotation_gap"]["mean"] == pytest.approx(d.mean())
        assert r["rotation_gap"]["stderr"] == pytest.approx(d.std(ddof=1) / 2 ** 0.5)
    assert "MNIST training digits" in (folders["train"] / "figure2.md").read_text()
    assert "MNIST test digits" in (folders["test"] / "figure2.md").read_text()
    with pytest.raises(UserError, match="test or train"):
        figure2.run_figure2(tiny_run, tmp_path / "x", n=3, images="validation")


def test_rotation_angles_pairs_the_figure2_digits_and_resumes(tiny_figure2, tmp_path, monkeypatch):
    # experiments/rotation_angles.py: its 90-degree gap is the Figure 2 report's (same digits, same
    # rotation), right angles are one row for both resamplings, and a finished transform is not redone
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import rotation_angles as ra
    tiny_run, reports, _ = tiny_figure2
    x = figure2.figure2_inputs(2, 90.0, 4, 0)["original"]
    names = list(ra.transforms(x, [45, 90], [45, 90], ["bilinear", "nearest"]))
    assert names == ["original", "rotated 45 (bilinear)", "rotated 45 (nearest)", "rotated 90 (either)",
                     "rotated 45 and back (bilinear)", "rotated 45 and back (nearest)"]  # 90 and back = original
    out = tmp_path / "ra"
    calls = []
    real = ra.run_bpd
    monkeypatch.setattr(ra, "run_bpd", lambda run, x: (calls.append(len(x)), real(run, x))[1])
    argv = ["rotation_angles.py", "--run", str(tiny_run.path), "--n", "2", "--angles", "90,45",
            "--back", "", "--interpolations", "nearest", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    ra.main()
    r = json.loads((out / "rotation_angles.json").read_text())
    assert sorted(r["transforms"]) == ["original", "rotated 45 (nearest)", "rotated 90 (nearest)"]
    assert r["transforms"]["rotated 90 (nearest)"]["gap"] == pytest.approx(reports["test"]["rotation_gap"]["mean"],
                                                                          abs=1e-4)
    assert not (out / "rotation_angles_partial.json").exists() and len(calls) == 3
    # interrupted after two transforms: the third alone is computed again
    keep = {k: r["transforms"][k]["bpd"] for k in ("original", "rotated 90 (nearest)")}
    from engine.presets import digest
    key = digest({"run": tiny_run.digest, "n": 2, "images": "test", "bpd_steps": tiny_run.preset.bpd_steps})
    (out / "rotation_angles_partial.json").write_text(json.dumps({"key": key, "bpd": keep}))
    calls.clear()
    ra.main()
    assert len(calls) == 1 and json.loads((out / "rotation_angles.json").read_text())["transforms"] == r["transforms"]
    monkeypatch.setattr(sys, "argv", argv[:-2] + ["--angles", "x", "--out", str(out)])
    with pytest.raises(SystemExit, match="comma-separated degrees"):
        ra.main()
