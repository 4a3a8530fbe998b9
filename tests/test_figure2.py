"""The Figure 2 report: its groups are what they claim, and an interrupted report resumes."""

import json

import pytest
import torch

from engine import data, training as train
from engine.experiments import figure2
from engine.presets import PRESETS
from engine.store import load_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("f2") / "run"
    train.train(PRESETS["tiny"], seed=0, out=out)
    return load_run(out)


def test_groups_are_rotations_averages_and_noise():
    g = figure2.figure2_inputs(n=3, angle=90, k_avg=4, seed=0)
    test, _ = data.load_test()
    idx = data.query_indices(3 * 5, 0)
    assert torch.equal(g["original"], test[idx[:3]])
    assert torch.allclose(g["rotated"], torch.rot90(test[idx[:3]], 1, dims=(-2, -1)), atol=1 / 255 + 1e-6)
    assert torch.allclose(g["averaged"][0], data.quantize(test[idx[3:7]].mean(0)))
    assert g["noise"].std() > 0.25  # uniform on [0, 1] has std 0.29


def test_interrupted_report_resumes_to_the_same_numbers(tiny_run, tmp_path):
    clean = figure2.run_figure2(tiny_run, tmp_path / "a", n=2)

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
